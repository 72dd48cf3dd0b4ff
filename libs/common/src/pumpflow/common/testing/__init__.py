"""Helpers for tests of pumpflow code and of code built on it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable


async def eventually(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail when it does not within ``within`` seconds.

    For outcomes that other tasks bring about (bus handlers, socket loops) and that
    offer nothing to await but the outcome itself. The limit only bounds a failure;
    a passing test returns as soon as the condition holds.
    """
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within:g} s")
        await asyncio.sleep(0.005)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
