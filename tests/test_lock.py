"""The locks in requirements/ hold what every pyproject.toml asks for, agree, name no host.

`make lock` writes them (scripts/lock.py); `make`, CI and deploy/Dockerfile install them
with `pip install --require-hashes`. No server needed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
PYPROJECTS = [
    ROOT / "pyproject.toml",
    ROOT / "libs/common/pyproject.toml",
    *sorted(ROOT.glob("services/*/pyproject.toml")),
]
SERVICES = sorted(p.parent.name for p in ROOT.glob("services/*/pyproject.toml"))
#: the workspace's own packages: installed from their folders, never from a lock
WORKSPACE = {canonicalize_name(tomllib.loads(p.read_text())["project"]["name"]) for p in PYPROJECTS}


class Pin:
    def __init__(self, version: Version, hashes: frozenset[str]):
        self.version = version
        self.hashes = hashes


def read_lock(text: str) -> dict[str, Pin]:
    """Name -> pinned version and hashes; raises on anything but `name==version --hash=...`."""
    pins = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = frozenset(re.findall(r"--hash=(\S+)", line))
        line = re.sub(r"--hash=\S+", "", line).strip()
        if line.startswith("-"):
            raise ValueError(f"an option, not a pin: {line}")
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if requirement.url or len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"not pinned with ==: {line}")
        pins[canonicalize_name(requirement.name)] = Pin(Version(specifiers[0].version), hashes)
    return pins


def asked_for(pyproject: dict) -> list[str]:
    """Every requirement a pyproject.toml makes: dependencies, optional ones, dependency
    groups and the build backend (installed from the lock: --no-build-isolation)."""
    project = pyproject.get("project", {})
    asked = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        asked += group
    for group in pyproject.get("dependency-groups", {}).values():
        asked += [r for r in group if isinstance(r, str)]  # {include-group = ...}: listed anyway
    asked += pyproject.get("build-system", {}).get("requires", [])
    return asked


def unmet(requirements: list[str], lock: dict[str, Pin]) -> list[str]:
    """The requirements that the lock does not hold, or holds at a version they refuse."""
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in WORKSPACE:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if name not in lock:
            problems.append(f"{text}: not in the lock")
        elif not requirement.specifier.contains(lock[name].version, prereleases=True):
            problems.append(f"{text}: the lock has {lock[name].version}")
    return problems


def in_file_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements/*.in file (not its -e and -c lines)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def lock(name: str) -> dict[str, Pin]:
    return read_lock((REQUIREMENTS / f"{name}.lock").read_text())


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_dev_lock_holds_what_every_pyproject_asks_for(pyproject):
    data = tomllib.loads(pyproject.read_text())
    assert unmet(asked_for(data), lock("dev")) == []


@pytest.mark.parametrize("service", SERVICES)
def test_each_image_lock_holds_what_its_packages_ask_for(service):
    asked = []
    for path in (ROOT / "libs/common", ROOT / "services" / service):
        asked += asked_for(tomllib.loads((path / "pyproject.toml").read_text()))
    assert unmet(asked, lock(service)) == []


@pytest.mark.parametrize("source", sorted(REQUIREMENTS.glob("*.in")), ids=lambda p: p.name)
def test_each_lock_holds_its_in_file(source):
    assert unmet(in_file_requirements(source), lock(source.stem)) == []


@pytest.mark.parametrize("service", SERVICES)
def test_every_image_lock_agrees_with_dev_lock(service):
    dev = lock("dev")
    for name, pin in lock(service).items():
        assert name in dev, f"{service}.lock: {name} is not in dev.lock"
        assert pin.version == dev[name].version, f"{service}.lock: {name}"
        assert pin.hashes == dev[name].hashes, f"{service}.lock: {name}"


def test_every_workspace_package_is_installed_and_no_lock_holds_one():
    """The Makefile installs the `-e` folders of dev.in; every service has its image lock."""
    editables = {
        (ROOT / line.removeprefix("-e ").strip()).resolve()
        for line in (REQUIREMENTS / "dev.in").read_text().splitlines()
        if line.startswith("-e ")
    }
    assert editables == {p.parent.resolve() for p in PYPROJECTS}
    assert sorted(p.stem for p in REQUIREMENTS.glob("*.lock")) == sorted(["dev", *SERVICES])
    for path in REQUIREMENTS.glob("*.lock"):
        assert not WORKSPACE & read_lock(path.read_text()).keys(), path.name


def names_a_place(text: str) -> bool:
    """A URL, a file: path or an option (-e, --index-url, --find-links...) but --hash."""
    return re.search(r"://|file:/|^\s*-(?!-hash=)", text, re.M) is not None


@pytest.mark.parametrize("path", sorted(REQUIREMENTS.glob("*.lock")), ids=lambda p: p.name)
def test_no_lock_names_a_host_and_every_pin_is_hashed(path):
    text = path.read_text()
    assert not names_a_place(text), path.name
    for name, pin in read_lock(text).items():
        assert pin.hashes, f"{path.name}: {name} has no hash"


def test_the_locks_are_for_the_images_python():
    base = re.search(r"^FROM python:(\d+\.\d+)", (ROOT / "deploy/Dockerfile").read_text(), re.M)
    assert base is not None
    for path in REQUIREMENTS.glob("*.lock"):
        assert f"pip-compile with Python {base.group(1)}\n" in path.read_text(), path.name


def test_the_checks_catch_what_the_lock_lacks():
    dev = lock("dev")
    msgspec = dev["msgspec"].version
    pyproject = tomllib.loads(
        f"""
        [project]
        name = "pumpflow-made-up"
        dependencies = ["pumpflow-common", "msgspec>{msgspec}"]
        [project.optional-dependencies]
        extra = ["nonexistent-pkg>=1"]
        [dependency-groups]
        dev = ["another-nonexistent-pkg"]
        [build-system]
        requires = ["hatchling<1"]
        """
    )
    assert unmet(asked_for(pyproject), dev) == [
        f"msgspec>{msgspec}: the lock has {msgspec}",
        "nonexistent-pkg>=1: not in the lock",
        "another-nonexistent-pkg: not in the lock",
        f"hatchling<1: the lock has {dev['hatchling'].version}",
    ]
    for text in ("--find-links /opt/wheels\n", "-e ./libs/common\n", "# see file:///x\n"):
        assert names_a_place(text), text
    assert not names_a_place("msgspec==0.23.0 \\\n    --hash=sha256:00\n")
    with pytest.raises(ValueError, match="an option"):
        read_lock("--extra-index-url file:///somewhere/simple\n")
    with pytest.raises(ValueError, match="not pinned"):
        read_lock("msgspec>=0.18 \\\n    --hash=sha256:00\n")


#: the oldest 3.11 an image or a machine may bring (Debian bookworm's python3.11 is 3.11.2)
OLDEST_311 = {"python_version": "3.11", "python_full_version": "3.11.0", "extra": ""}


@pytest.mark.parametrize("name", ["dev", *SERVICES])
def test_each_lock_is_complete_on_every_311(name):
    """What each locked package needs on the oldest 3.11 is locked too.

    pip-compile resolves markers for the Python it runs on: a requirement marked
    ``python_full_version < '3.11.3'`` (redis on async-timeout) is dropped on 3.11.7 and
    then missing where the image's 3.11.2 asks for it.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    pins = lock(name)
    missing = []
    for package in pins:
        try:
            requires = distribution(package).requires or []
        except PackageNotFoundError:
            continue  # not installed in this environment (an image-only pin)
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(OLDEST_311):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in pins and dependency not in WORKSPACE:
                missing.append(f"{package} needs {text}")
    assert not missing, missing
