"""Group commit: changes numbered as they are made, stored by one write at a time.

A writer (the keyed consumer, trading's token views) numbers each change it makes
(:meth:`GroupCommit.change`) and hands :class:`GroupCommit` a ``write`` that stores
everything changed so far. One write runs at a time; when it ends, the next takes all
that changed meanwhile, so the handlers that waited meanwhile share it. Whoever waits
for a change is done once a write that took it has stored it:

- :meth:`GroupCommit.when_stored` resolves a future, the writes running in a task
  (no coroutine per waiter, for a hot path);
- :meth:`GroupCommit.until_stored` is awaited, and the first to wait writes, inline: no
  task, so a store that answers at once (the in-process one) leaves the event loop's
  order as it was. Changes made during its write go on in a task.

A write that raises fails the waiters of the changes it took; what it did not store
is the writer's to keep for a later write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

#: a write under way in a waiter's own coroutine (not a task)
_INLINE = object()


class GroupCommit:
    """Numbers changes and stores them in shared writes; see the module."""

    __slots__ = ("_taken", "_waiters", "_write", "_writing", "changed", "stored")

    def __init__(self, write: Callable[[int], Awaitable[None]]):
        #: stores every change made so far; given the number of the last one it takes
        self._write = write
        #: number of the last change made, and of the last one stored
        self.changed = 0
        self.stored = 0
        #: number of the last change a write took (stored, failed, or under way)
        self._taken = 0
        #: (change, future) of those waiting
        self._waiters: list[tuple[int, asyncio.Future]] = []
        #: the task writing, _INLINE, or None
        self._writing: object | None = None

    def change(self) -> int:
        """Number a new change (stored by the next write to begin)."""
        self.changed += 1
        return self.changed

    def when_stored(self, change: int, done: asyncio.Future) -> None:
        """Resolve ``done`` once ``change`` is stored (fail it with the error of the write
        that took it); starts a write if none is under way (again, if a write of it failed)."""
        if self.stored >= change:
            done.set_result(None)
            return
        self._waiters.append((change, done))
        if self._writing is None and self._taken >= change:
            # a write took it and failed: nothing else would write it again
            self._taken = self.stored
        self.kick()

    def kick(self) -> None:
        """Write what changed since the last write took its changes, in a task, unless a
        write is under way."""
        if self._writing is None and self._taken < self.changed:
            self._writing = asyncio.get_running_loop().create_task(self._run())

    async def until_stored(self, change: int) -> None:
        """Return once ``change`` is stored; raise what the write that took it raised.

        With no write under way the caller writes (again, if a write of it failed).
        """
        if self.stored >= change:
            return
        if self._writing is not None:
            done = asyncio.get_running_loop().create_future()
            self._waiters.append((change, done))
            await done
            return
        self._writing = _INLINE
        try:
            while self.stored < change:
                upto = self._taken = self.changed
                try:
                    await self._write(upto)
                except BaseException as exc:
                    self._failed(upto, exc)
                    raise
                self._wrote(upto)
        finally:
            self._writing = None
            self.kick()

    def settle(self) -> None:
        """Count every change made so far as stored (the writer dropped them)."""
        self.stored = self._taken = self.changed
        self._waiters = wake(self._waiters, self.changed)

    def cancel(self) -> None:
        """Stop the task writing and cancel every waiter (a crash: nothing more is stored)."""
        if isinstance(self._writing, asyncio.Future):
            self._writing.cancel()
        for _, done in self._waiters:
            done.cancel()
        self._waiters = []

    async def _run(self) -> None:
        """Write until every change is taken (the write task)."""
        try:
            while self._taken < self.changed:
                upto = self._taken = self.changed
                try:
                    await self._write(upto)
                except Exception as exc:
                    self._failed(upto, exc)
                    continue
                except BaseException as exc:
                    self._failed(upto, exc)
                    raise
                self._wrote(upto)
        finally:
            self._writing = None

    def _wrote(self, upto: int) -> None:
        if upto > self.stored:
            self.stored = upto
        if self._waiters:
            self._waiters = wake(self._waiters, upto)

    def _failed(self, upto: int, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            self._waiters = wake(self._waiters, upto, exc)
        else:
            # cancelled: not stored, the next write takes it again
            self._taken = self.stored


def wake(
    waiters: list[tuple[int, asyncio.Future]], upto: int, exc: BaseException | None = None
) -> list[tuple[int, asyncio.Future]]:
    """Resolve the waiters of changes up to ``upto`` (fail them with ``exc`` if given);
    return the others."""
    waiting = []
    for waiter in waiters:
        if waiter[0] <= upto:
            done = waiter[1]
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)
        else:
            waiting.append(waiter)
    return waiting
