"""Import layers (the contracts in .importlinter), and proof that the check catches breaches.

The second and third tests run the same contracts over a synthetic package: one clean,
one with a breach of every rule, so a contract that checks nothing fails here.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"
FAKE = "layercheck"

#: module of the synthetic package -> the import that breaks a rule, and what it breaks
BREACHES = {
    "common.clock": ("common.state", "the kernel imports infrastructure"),
    "common.events": ("common.features", "the kernel imports the domain"),
    "common.features": ("common.activity", "one domain imports the other"),
    "common.activity": ("redis", "the domain does I/O"),
    "common.bus": ("common.runtime", "infrastructure imports the runtime"),
    "common.state": ("cli", "the library imports the CLI"),
    "feed": ("features", "a service imports another"),
}


def lint_imports(config: Path, cwd: Path, pythonpath: str | None = None) -> tuple[int, str]:
    linter = Path(sys.executable).with_name("lint-imports")
    assert linter.exists(), f"{linter} is missing: import-linter is not installed"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [str(linter), "--no-cache", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    return result.returncode, result.stdout + result.stderr


def fake_package(tmp_path: Path, breaches: dict[str, tuple[str, str]]) -> Path:
    """The contracts renamed onto ``layercheck``, and a package with each module they name."""
    text = CONFIG.read_text().replace("pumpflow", FAKE)
    parser = configparser.ConfigParser()
    parser.read_string(text)
    modules: set[str] = set()
    for section in parser.sections():
        contract = parser[section]
        prefixes = contract.get("containers", "").split() or [""]
        listed = " ".join((contract.get("layers", ""), contract.get("source_modules", "")))
        names = re.split(r"[\s|:()]+", listed)
        for prefix in prefixes:
            modules.update(f"{prefix}.{n}" if prefix else n for n in names if n)
    for module in modules:
        path = tmp_path.joinpath(*module.split("."))
        path.mkdir(parents=True, exist_ok=True)
        for parent in [path, *path.relative_to(tmp_path).parents]:
            if parent != Path("."):
                (tmp_path / parent / "__init__.py").touch()
    for module, (target, _) in breaches.items():
        init = tmp_path.joinpath(FAKE, *module.split("."), "__init__.py")
        imported = target if target == "redis" else f"{FAKE}.{target}"
        init.write_text(f"import {imported}\n")
    config = tmp_path / "contracts.ini"
    config.write_text(text)
    return config


def test_the_import_layers_hold():
    code, report = lint_imports(CONFIG, ROOT)
    assert code == 0, report[-8000:]


def test_the_contracts_pass_a_clean_package(tmp_path):
    config = fake_package(tmp_path, {})
    code, report = lint_imports(config, tmp_path, str(tmp_path))
    assert code == 0, report[-8000:]


def test_the_contracts_catch_every_kind_of_breach(tmp_path):
    config = fake_package(tmp_path, BREACHES)
    unlisted = tmp_path / FAKE / "common" / "unlisted.py"
    unlisted.touch()
    code, report = lint_imports(config, tmp_path, str(tmp_path))
    assert code != 0, report[-8000:]
    # the report wraps long lines: compare without whitespace
    flat = "".join(report.split())
    for module, (target, rule) in BREACHES.items():
        imported = target if target == "redis" else f"{FAKE}.{target}"
        assert f"{FAKE}.{module}->{imported}" in flat, f"not caught: {rule}\n{report[-8000:]}"
    assert f"notlistedaslayers:-{FAKE}.common.unlisted" in flat, report[-8000:]
