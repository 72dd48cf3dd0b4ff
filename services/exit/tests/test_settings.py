"""The exit service's settings: each one it defines does something."""

from __future__ import annotations

import re
from pathlib import Path

from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.exit.settings import ExitSettings

_SOURCE = Path(__file__).parents[1] / "src" / "pumpflow" / "exit"


def test_every_setting_of_the_exit_is_read_by_its_code():
    """A setting defined and never read promises what the service does not do (a closed
    position's token leaving memory on a TTL of its own, say)."""
    code = "\n".join(p.read_text() for p in _SOURCE.glob("*.py"))
    own = set(ExitSettings.model_fields) - set(CommonSettings.model_fields)
    unread = sorted(name for name in own if not re.search(rf"\.{name}\b", code))
    assert unread == []
