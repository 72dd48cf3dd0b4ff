"""Datasets: a market run as JSONL of raw frames with arrival times, and loading it.

One line per frame: ``{"t": <epoch seconds>, "frame": <the exact frame>}``. Loading
decodes each frame with :mod:`pumpflow.common.pumpportal` into its v1 payload and
stores it through :class:`pumpflow.common.storage.TokenEventStore` (COPY, idempotent
on signature), exactly as the feed would have.

A recording (``pumpflow record --out``: one event envelope a line) reads as a dataset
too, told by its first line: each published event is the frame its payload was decoded
from (a v1 token payload has the frame's fields, names and values) at its arrival time.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.events import (
    Event,
    EventValidationError,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    decode_event,
    encode_payload,
    make_event,
)
from pumpflow.common.pumpportal import decode_token_frame
from pumpflow.common.runtime.arguments import UsageError
from pumpflow.simulator.market import Frame, Market

log = logging.getLogger(__name__)

#: source stamped on events loaded from a dataset
LOAD_SOURCE = "simulator.dataset"


class DatasetError(UsageError):
    """A dataset file that cannot be opened (not there, a folder) or a line of one that is
    not ``{"t": ..., "frame": ...}``: input the command refuses, as a flag's bad value."""


#: (arrival epoch seconds, frame bytes)
TimedFrame = tuple[float, bytes]


class _Line(msgspec.Struct):
    t: float
    frame: msgspec.Raw


def market_events(
    market: Market, duration_s: float, *, start_epoch: float, source: str = LOAD_SOURCE
) -> Iterator[Event]:
    """The market's frames as the feed would publish them: v1 events, per-mint seq."""
    sequencer = Sequencer()
    encode = msgspec.json.Encoder().encode
    for t, frame in market.frames(duration_s):
        payload = decode_token_frame(encode(frame))
        yield make_event(
            payload, source=source, time=start_epoch + t, seq=sequencer.next(payload.mint)
        )


def write_dataset(
    market: Market, path: str | Path, *, duration_s: float, start_epoch: float
) -> int:
    """Write ``duration_s`` of the market to ``path`` (JSONL); return the number of frames."""
    encode = msgspec.json.Encoder().encode
    count = 0
    with open(path, "wb", buffering=1 << 20) as out:
        write = out.write
        for t, frame in market.frames(duration_s):
            write(b'{"t":%s,"frame":%s}\n' % (encode(start_epoch + t), encode(frame)))
            count += 1
    return count


def read_dataset_raw(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield ``(arrival epoch seconds, frame bytes)`` per frame of a dataset file (as
    written) or of a recording (see the module docstring), told by its first line."""
    try:
        opened = open(path, "rb")
    except OSError as exc:
        raise DatasetError(f"{path}: {exc.strerror}") from None
    with opened as src:
        lines = ((number, line) for number, line in enumerate(src, 1) if line.strip())
        first = next(lines, None)
        if first is None:
            return
        read = _recorded_frames if _is_recording(first[1]) else _dataset_frames
        yield from read(path, itertools.chain((first,), lines))


def _is_recording(line: bytes) -> bool:
    """Whether ``line`` is an event envelope rather than a dataset line."""
    try:
        item = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return False  # the dataset reader names what is wrong with it
    return isinstance(item, dict) and "frame" not in item and {"type", "data"} <= item.keys()


def _dataset_frames(path: str | Path, lines: Iterable[tuple[int, bytes]]) -> Iterator[TimedFrame]:
    decode = msgspec.json.Decoder(_Line).decode
    for number, line in lines:
        try:
            item = decode(line)
        except msgspec.DecodeError as exc:
            raise DatasetError(
                f"{path}:{number}: not a dataset line: {exc} (a dataset line is "
                '{"t": ..., "frame": ...}, as pumpflow sim dataset writes)'
            ) from None
        yield item.t, bytes(item.frame)


def _recorded_frames(path: str | Path, lines: Iterable[tuple[int, bytes]]) -> Iterator[TimedFrame]:
    for number, line in lines:
        try:
            event = decode_event(line)
        except EventValidationError as exc:
            raise DatasetError(
                f"{path}:{number}: not a recorded event: {exc} (a recording's line is an "
                "event envelope, as pumpflow record --out writes)"
            ) from None
        if event.seq is None:
            # stored by the recorder, never published (a trade of a mint the feed was
            # not subscribed to): not replayed, as from Postgres
            continue
        if not isinstance(event.data, TokenCreated | TokenTrade | TokenMigrated):
            raise DatasetError(
                f"{path}:{number}: a {event.type} event, not a token event a frame gives"
            )
        yield event.time, encode_payload(event.data)


def read_dataset(path: str | Path) -> Iterator[tuple[float, Frame]]:
    """Yield ``(arrival epoch seconds, frame dict)`` per line, numbers keeping their JSON type."""
    decode = msgspec.json.decode
    for t, raw in read_dataset_raw(path):
        yield t, decode(raw)


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    frames: int
    inserted: int
    rejected: int


def dataset_events(
    path: str | Path,
    *,
    source: str = LOAD_SOURCE,
    rejected: list[str] | None = None,
    timed_frames: Iterable[TimedFrame] | None = None,
) -> Iterator[tuple[Event, bytes]]:
    """Each frame of ``path`` (or ``timed_frames``, read from it already) as the event
    the feed would have published, with the frame.

    Per-mint seq as the feed assigns it. A frame that does not decode is logged with the
    reason, appended to ``rejected`` and skipped.
    """
    sequencer = Sequencer()
    timed = read_dataset_raw(path) if timed_frames is None else timed_frames
    for number, (t, raw) in enumerate(timed, 1):
        try:
            payload = decode_token_frame(raw)
        except EventValidationError as exc:
            if rejected is not None:
                rejected.append(str(exc))
            log.warning("skipping frame %d of %s: %s", number, path, exc)
            continue
        yield make_event(payload, source=source, time=t, seq=sequencer.next(payload.mint)), raw


async def load_dataset(
    path: str | Path,
    store,
    *,
    batch_size: int = 5_000,
    source: str = LOAD_SOURCE,
    timed_frames: Iterable[TimedFrame] | None = None,
) -> LoadResult:
    """Decode every frame of ``path`` (or ``timed_frames``, read from it already) and
    write it to ``store`` (a TokenEventStore).

    Frames that do not decode are counted, logged with the reason and skipped; the
    rest are written. Loading the same file twice inserts nothing the second time.
    """
    events, frames = [], []
    rejected: list[str] = []
    total = inserted = 0
    read = dataset_events(path, source=source, rejected=rejected, timed_frames=timed_frames)
    while True:
        try:
            event, raw = next(read)
        except StopIteration:
            break
        except DatasetError as exc:
            if not inserted:
                raise
            # the batches before it are in the store: a run of it would be of a part
            raise DatasetError(
                f"{exc}; the {inserted:,} frames before it are stored (load the mended "
                "file again: what is stored is not stored twice)"
            ) from None
        total += 1
        events.append(event)
        frames.append(raw)
        if len(events) >= batch_size:
            inserted += await store.write(events, frames)
            events, frames = [], []
    if events:
        inserted += await store.write(events, frames)
    return LoadResult(frames=total + len(rejected), inserted=inserted, rejected=len(rejected))
