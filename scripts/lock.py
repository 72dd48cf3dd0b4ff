"""Refresh the locks in requirements/ (run it as `make lock`).

requirements/dev.in -> requirements/dev.lock: every package the workspace, its tests
and tools need, direct and transitive, pinned with hashes. Then each
requirements/<service>.in -> requirements/<service>.lock, constrained by dev.lock
(`-c dev.lock` in the .in file) so that every lock holds the same versions.

pip-compile keeps the pins a lock already has unless a requirement forces a change;
`make lock LOCK_ARGS=--upgrade` moves every pin to the newest release that fits,
`make lock LOCK_ARGS="--upgrade-package msgspec"` just one.

The workspace's own packages (pumpflow-*) are compiled in as `-e` lines so that their
dependencies get resolved, then dropped from the locks: they are on no index, and
`pip install --require-hashes` refuses editables. The Makefile, CI and the Dockerfile
install them with --no-deps --no-build-isolation after the lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
#: the Python of the images (deploy/Dockerfile) and of CI; markers are resolved for it
PYTHON = (3, 11)
OPTIONS = [
    "--allow-unsafe",  # pin pip and setuptools too
    "--strip-extras",
    # pip.conf's find-links, extra indexes and trusted hosts stay out of the files
    "--no-emit-index-url",
    "--no-emit-find-links",
    "--no-emit-trusted-host",
    "--quiet",
]
#: what pip-compile says of the `-e` entries, which strip_editables drops
NOISE = "The generated requirements file may be rejected by pip install"


def compile_lock(source: Path, extra: list[str]) -> Path:
    lock = source.with_suffix(".lock")
    command = [sys.executable, "-m", "piptools", "compile", *OPTIONS, *extra]
    command += ["--output-file", str(lock.relative_to(ROOT)), str(source.relative_to(ROOT))]
    result = subprocess.run(
        command,
        cwd=ROOT,
        # the header of each lock names the command to run again
        env={**os.environ, "CUSTOM_COMPILE_COMMAND": "make lock"},
        stderr=subprocess.PIPE,
        text=True,
    )
    errors = result.stderr.splitlines(keepends=True)
    sys.stderr.write("".join(line for line in errors if NOISE not in line))
    if result.returncode != 0:
        sys.exit(f"pip-compile failed on {source.relative_to(ROOT)}")
    lock.write_text(strip_editables(lock.read_text()))
    return lock


def strip_editables(text: str) -> str:
    """Drop the `-e <path>` entries, their `# via` lines and pip-compile's warnings about them."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line.startswith("-e "):
            # the warning pip-compile writes just above an unhashed entry
            while out and out[-1].startswith(("# WARNING: pip install will require", "# Consider")):
                out.pop()
            skipping = True
            continue
        if skipping and line.startswith("    "):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


def pins_with_hashes(text: str) -> dict[str, list[str]]:
    """`name==version` -> its line and hash lines, from a lock made with --generate-hashes."""
    pins: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            current = pins.setdefault(line.removesuffix(" \\"), [line])
        elif current is not None and line.strip().startswith("--hash="):
            current.append(line)
        else:
            current = None
    return pins


def add_hashes(lock: Path, hashed: dict[str, list[str]]) -> None:
    """Give each pin of `lock` dev.lock's hashes, the ones pip-compile would compute again."""
    out = []
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            if line not in hashed:
                sys.exit(f"{lock.relative_to(ROOT)}: {line} is not in dev.lock")
            out.extend(hashed[line])
        else:
            out.append(line)
    lock.write_text("\n".join(out) + "\n")


def main() -> int:
    if sys.version_info[:2] != PYTHON:
        print(
            f"lock with Python {PYTHON[0]}.{PYTHON[1]}, the images' (this is "
            f"{sys.version_info[0]}.{sys.version_info[1]}): "
            f"rm -rf .venv && make lock PYTHON=python{PYTHON[0]}.{PYTHON[1]}",
            file=sys.stderr,
        )
        return 1
    dev = compile_lock(REQUIREMENTS / "dev.in", ["--generate-hashes", *sys.argv[1:]])
    hashed = pins_with_hashes(dev.read_text())
    for source in sorted(REQUIREMENTS.glob("*.in")):
        if source.name == "dev.in":
            continue
        # derived from dev.lock alone: drop the old file so no stale pin is preferred
        source.with_suffix(".lock").unlink(missing_ok=True)
        # hashing every file again takes minutes; the pins are dev.lock's, so are the hashes
        add_hashes(compile_lock(source, []), hashed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
