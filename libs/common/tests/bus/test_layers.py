"""The bus is infrastructure: it may use the kernel and the store, never the runtime
(which builds it), the domain or the services."""

from __future__ import annotations

import ast
from pathlib import Path

import pumpflow.common.bus as bus_package

FORBIDDEN = (
    "pumpflow.common.runtime",
    "pumpflow.common.consumer",
    "pumpflow.common.features",
    "pumpflow.common.activity",
    "pumpflow.cli",
    "pumpflow.feed",
    "pumpflow.features",
    "pumpflow.activity",
)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, TYPE_CHECKING and function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_bus_imports_neither_the_runtime_nor_anything_above_it():
    files = sorted(Path(bus_package.__file__).parent.glob("*.py"))
    assert len(files) > 5
    wrong = {
        f"{path.name}: {module}"
        for path in files
        for module in imports_of(path)
        if module.startswith(FORBIDDEN)
    }
    assert not wrong, sorted(wrong)


def test_the_check_sees_a_typing_only_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pumpflow.common.runtime.settings import CommonSettings\n"
    )
    assert "pumpflow.common.runtime.settings" in imports_of(sample)
