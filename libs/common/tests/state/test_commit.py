"""GroupCommit: the waiters of changes made during a write share the next one; the first
to wait writes inline; a failed write fails the waiters of what it took, and later
changes are written as usual."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.state.commit import GroupCommit


class Writes:
    """A write that records the last change each call took, held at a gate if closed."""

    def __init__(self) -> None:
        self.took: list[int] = []
        self.tasks: list[asyncio.Task | None] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[Exception] = []
        #: set once a write has begun
        self.began = asyncio.Event()

    async def __call__(self, upto: int) -> None:
        self.took.append(upto)
        self.tasks.append(asyncio.current_task())
        self.began.set()
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)


async def test_the_waiters_of_changes_made_during_a_write_share_the_next_one():
    writes = Writes()
    commit = GroupCommit(writes)
    writes.gate.clear()
    first = asyncio.ensure_future(commit.until_stored(commit.change()))
    await writes.began.wait()  # its write took change 1 and waits at the gate
    assert writes.took == [1]
    later = [asyncio.ensure_future(commit.until_stored(commit.change())) for _ in range(3)]
    done = asyncio.get_running_loop().create_future()
    commit.when_stored(commit.changed, done)
    writes.gate.set()
    await asyncio.gather(first, *later, done)
    # one write for the three changes made meanwhile
    assert writes.took == [1, 4]
    assert commit.stored == 4


async def test_the_first_to_wait_writes_inline_and_a_stored_change_is_not_written_again():
    writes = Writes()
    commit = GroupCommit(writes)
    change = commit.change()
    await commit.until_stored(change)
    assert writes.tasks == [asyncio.current_task()]
    await commit.until_stored(change)
    done = asyncio.get_running_loop().create_future()
    commit.when_stored(change, done)
    assert done.done() and writes.took == [1]


async def test_when_stored_writes_in_a_task():
    writes = Writes()
    commit = GroupCommit(writes)
    done = asyncio.get_running_loop().create_future()
    commit.when_stored(commit.change(), done)
    await done
    assert writes.took == [1] and writes.tasks[0] is not asyncio.current_task()


async def test_a_failed_write_fails_the_waiters_of_what_it_took_and_later_changes_go_on():
    writes = Writes()
    commit = GroupCommit(writes)
    writes.failures.append(RuntimeError("store down"))
    writes.gate.clear()
    change = commit.change()
    writer = asyncio.ensure_future(commit.until_stored(change))
    await writes.began.wait()
    same = asyncio.get_running_loop().create_future()
    commit.when_stored(change, same)
    writes.gate.set()
    with pytest.raises(RuntimeError, match="store down"):
        await writer
    with pytest.raises(RuntimeError, match="store down"):
        await same
    assert commit.stored == 0
    # waited for again, a change a failed write took is written again
    await commit.until_stored(change)
    assert commit.stored == 1
    await commit.until_stored(commit.change())
    assert writes.took == [1, 1, 2]


async def test_an_inline_writer_cancelled_leaves_its_changes_to_a_task_for_the_others():
    writes = Writes()
    commit = GroupCommit(writes)
    writes.gate.clear()
    change = commit.change()
    writer = asyncio.ensure_future(commit.until_stored(change))
    await writes.began.wait()
    other = asyncio.get_running_loop().create_future()
    commit.when_stored(change, other)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    writes.gate.set()
    await other
    assert writes.took == [1, 1] and commit.stored == 1


async def test_settle_counts_the_changes_made_as_stored_and_cancel_ends_the_waiters():
    writes = Writes()
    commit = GroupCommit(writes)
    commit.change()
    commit.settle()
    await commit.until_stored(commit.changed)
    assert writes.took == []
    writes.gate.clear()
    done = asyncio.get_running_loop().create_future()
    commit.when_stored(commit.change(), done)
    await writes.began.wait()
    commit.cancel()
    assert done.cancelled()


async def test_a_change_a_failed_write_took_is_written_again_when_waited_for_in_a_task():
    writes = Writes()
    commit = GroupCommit(writes)
    writes.failures.append(RuntimeError("store down"))
    change = commit.change()
    failed = asyncio.get_running_loop().create_future()
    commit.when_stored(change, failed)
    with pytest.raises(RuntimeError, match="store down"):
        await failed
    # waited for again with nothing changed since: written again, not waited for for ever
    again = asyncio.get_running_loop().create_future()
    commit.when_stored(change, again)
    await asyncio.wait_for(again, 5.0)
    assert commit.stored == 1
    assert writes.took == [1, 1]
