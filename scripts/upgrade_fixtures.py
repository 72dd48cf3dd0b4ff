#!/usr/bin/env python3
"""Encode the upgrade tests' samples with a released commit, and check the way back.

    .venv/bin/python scripts/upgrade_fixtures.py <commit> [--forward]

Checks the commit out in a temporary git worktree and runs ``tests/upgrade/samples.py``
with its sources first on the python path (this tree's virtualenv for the packages), so
the release itself encodes every sample: they go to ``tests/upgrade/fixtures/<commit>``,
which ``tests/upgrade/test_upgrade.py`` decodes with this tree's code (an upgrade reads
what the release stored and queued). ``--forward`` also encodes the samples with this
tree and decodes them with the release (a rolling upgrade: its replicas read the new
ones' messages and records), printing what differs and exiting 1 on any difference.
The worktree is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "upgrade" / "samples.py"
FIXTURES = ROOT / "tests" / "upgrade" / "fixtures"


def _sources(tree: Path) -> str:
    """A checkout's package sources, as a python path."""
    found = [tree / "src", *sorted(tree.glob("libs/*/src")), *sorted(tree.glob("services/*/src"))]
    return os.pathsep.join(str(p) for p in found if p.is_dir())


def _samples(tree: Path | None, *args: str) -> int:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = _sources(tree)
    command = [sys.executable, str(SAMPLES), *args]
    return subprocess.call(command, env=env, cwd=tempfile.gettempdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the released commit (its fixtures directory's name)")
    parser.add_argument("--forward", action="store_true",
                        help="also decode this tree's samples with the release")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pumpflow-upgrade-") as scratch:
        tree = Path(scratch) / "release"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.commit],
            check=True,
        )
        try:
            failed = _samples(tree, "write", str(FIXTURES / args.commit))
            if args.forward and not failed:
                newer = Path(scratch) / "newer"
                failed = _samples(None, "write", str(newer)) or _samples(tree, "check", str(newer))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
