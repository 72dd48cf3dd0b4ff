"""Standard output whose reader may leave before the end (``pumpflow ... | head``).

A reader gone ends a command quietly, as SIGPIPE ends a shell tool: nothing is said on
stderr, what is left to print goes to /dev/null, and the exit status is
:data:`READER_GONE`. Python ignores SIGPIPE, so a write raises ``BrokenPipeError``
instead, as does one to a server's socket closed under it: :func:`reader_gone` tells
the two apart.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable
from typing import TextIO

#: the exit status of a command whose reader left: Python's own on EPIPE
READER_GONE = 1


def reader_gone(exc: BaseException, stream: TextIO | None = None) -> bool:
    """Whether ``exc`` is a write to ``stream`` (standard output) whose reader has closed
    it, not to a server's socket."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        fd = (sys.stdout if stream is None else stream).fileno()
    except (AttributeError, OSError, ValueError):
        return False  # not a file: no pipe of its own to break
    poller = select.poll()
    # reported unasked: a pipe's writer gets POLLERR once the reader closed it
    poller.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def discard() -> None:
    """Send standard output to /dev/null: its reader is gone, and what is still buffered
    would fail again in the interpreter's exit (a traceback after the end)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class LeavableOutput:
    """A text sink writing to ``stream`` until its reader leaves; from then on it drops
    every write and calls ``on_gone``, once, so a command that runs until stopped ends
    as if interrupted rather than failing in whatever wrote last. A ``stream`` of None
    (started with standard output closed) takes everything, as ``print`` does."""

    def __init__(self, stream: TextIO | None, on_gone: Callable[[], object]):
        self.stream = stream
        self.on_gone = on_gone
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone and self.stream is not None:
            try:
                self.stream.write(text)
            except BrokenPipeError as exc:
                self._left(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone and self.stream is not None:
            try:
                self.stream.flush()
            except BrokenPipeError as exc:
                self._left(exc)

    def _left(self, exc: BrokenPipeError) -> None:
        if not reader_gone(exc, self.stream):
            raise exc
        self.gone = True
        self.on_gone()
