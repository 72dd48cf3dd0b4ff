"""Processing priority of a key's work: the worker pool runs higher first."""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    """Recommended processing priority of a token; higher is more important."""

    IDLE = 0
    LOW = 1
    NORMAL = 2
    HIGH = 3
    URGENT = 4
