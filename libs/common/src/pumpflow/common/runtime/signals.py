"""SIGINT and SIGTERM as a command line's request to stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT or SIGTERM within the block, and take the handlers away at
    its end. Left to the loop's close, which closes its wakeup pipe before it removes
    them, a signal arriving in between (a second Ctrl-C, a group's signal) is written to
    the closed pipe: a traceback on stderr."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):  # no signals but in the main thread
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
