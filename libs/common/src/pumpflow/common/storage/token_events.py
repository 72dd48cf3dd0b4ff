"""Postgres store of token events: bulk writes with COPY, flat-memory replays.

Writes COPY a batch into a per-connection staging table, then insert it into
``token_events`` with ``ON CONFLICT DO NOTHING`` (idempotent on signature and
txType) and upsert ``tokens`` in the same transaction. The ``frame`` column keeps
the frame exactly as received, so a replay decodes the very bytes the live feed
decoded and reproduces its payloads byte for byte; ``renumbered`` keeps the
envelope's mark (the first event of a mint's fresh numbering), so what is published
again or replayed from here is taken for no gap, as the live event was.

Reads go through a server-side cursor inside a transaction, so replaying millions
of rows holds only ``batch_size`` of them in memory. Each fetch of a batch is one
command, bounded by the pool's command timeout (a rebuild's history, the feed's
recovery, a token's window: found by an index, short), or by
:data:`REPLAY_FETCH_TIMEOUT_S` for a replay of the history (its first fetch may sort
every row it reads before returning one): either way a frozen server is met.

A write may name its :class:`Writer` (the feed's lease holder): it is refused
(:class:`Superseded`, nothing of it stored) once another writer took its publisher's
writes over (:meth:`TokenEventStore.take_writes`, table ``token_event_writer``,
migration 0023). The check is the write's last statement and reads the row shared: a
take-over waits for a write that passed it to commit, so what the new writer reads
next holds every event stored as the old one. While the row is held, a transaction
idle past :data:`~pumpflow.common.db.transactions.HOLDING_IDLE_LIMIT_S` (its process
frozen) is ended by the server, so a take-over waits at most that long for it.

An event the store refused (dead-lettered by the feed) is stored later by
``store_redriven`` once its cause is fixed: idempotent on signature and txType like
every write, and recorded in ``token_event_redrives`` with whether it was published,
so its redrive publishes it once and the outbox never republishes it.

``prune`` deletes old events in batches, each its own short transaction: a write
waits for a batch only on a row both touch (a duplicate frame of a pruned event). It
keeps what is still needed (see its docstring). A replay reads through one cursor, so it
reads its snapshot to the end whatever a prune deletes meanwhile (MVCC: vacuum keeps
rows a running snapshot sees); a replay begun later starts after the rows gone.

``rejects`` tells a batch the store refuses for its rows (a value Postgres cannot
hold or index: retrying the same rows fails again) from a store that is unwell (a
lost connection, a server restarting or full: retrying later succeeds). Only the
first may cost a row; the second is always waited out. An error of neither kind
known here (a missing table, say) counts as the store's: retried, and visible in the
writer's readiness, rather than dead-lettering every row of the market.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from asyncpg.exceptions._base import DataError as ClientDataError

from pumpflow.common.db.transactions import bound_idle_sql
from pumpflow.common.events import (
    Event,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    encode_payload,
    source_service,
)
from pumpflow.common.pumpportal import decode_token_frame

_STAGE = "pumpflow_token_event_stage"
_STAGE_COLUMNS = (
    "ord",
    "signature",
    "tx_type",
    "mint",
    "event_time",
    "seq",
    "source",
    "event_id",
    "trader",
    "sol_amount",
    "token_amount",
    "v_sol",
    "v_tokens",
    "market_cap_sol",
    "frame",
    "name",
    "symbol",
    "uri",
    "initial_buy",
    "pool",
    "is_mayhem_mode",
    "renumbered",
)
_CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    ord integer NOT NULL,
    signature text NOT NULL,
    tx_type text NOT NULL,
    mint text NOT NULL,
    event_time double precision NOT NULL,
    seq bigint,
    source text NOT NULL,
    event_id text NOT NULL,
    trader text,
    sol_amount double precision,
    token_amount double precision,
    v_sol double precision,
    v_tokens double precision,
    market_cap_sol double precision,
    frame text NOT NULL,
    name text,
    symbol text,
    uri text,
    initial_buy double precision,
    pool text,
    is_mayhem_mode boolean,
    renumbered boolean NOT NULL
) ON COMMIT DELETE ROWS
"""
# jsonb refuses the \u0000 escape that JSON allows; only the queryable copy changes
_INSERT_EVENTS = f"""
WITH inserted AS (
    INSERT INTO token_events (
        signature, tx_type, mint, event_time, seq, source, event_id, trader,
        sol_amount, token_amount, v_sol_in_bonding_curve, v_tokens_in_bonding_curve,
        market_cap_sol, payload, frame, renumbered)
    SELECT signature, tx_type, mint, event_time, seq, source, event_id, trader,
           sol_amount, token_amount, v_sol, v_tokens, market_cap_sol,
           replace(frame, '\\u0000', '\\ufffd')::jsonb, frame, renumbered
    FROM pg_temp.{_STAGE}
    ORDER BY ord
    ON CONFLICT (signature, tx_type) DO NOTHING
    RETURNING id)
SELECT count(*) AS inserted, max(id) AS last_id FROM inserted
"""
#: the staged events whose stored row is that very event (inserted now or by an earlier
#: attempt of the same batch), as opposed to another event with the same signature
_OWN_EVENT_IDS = f"""
SELECT coalesce(array_agg(s.event_id), '{{}}') AS event_ids
FROM pg_temp.{_STAGE} AS s
JOIN token_events AS t
  ON t.signature = s.signature AND t.tx_type = s.tx_type AND t.event_id = s.event_id
"""
_INSERT_TOKENS = f"""
INSERT INTO tokens (
    mint, signature, creator, name, symbol, uri, created_at, initial_buy,
    v_sol_in_bonding_curve, v_tokens_in_bonding_curve, market_cap_sol, pool, is_mayhem_mode)
SELECT mint, signature, trader, name, symbol, uri, event_time, initial_buy,
       v_sol, v_tokens, market_cap_sol, pool, is_mayhem_mode
FROM pg_temp.{_STAGE}
WHERE tx_type = 'create'
ORDER BY ord
ON CONFLICT DO NOTHING
"""
_MARK_MIGRATED = f"""
UPDATE tokens AS t SET migrated_at = s.event_time
FROM (SELECT mint, min(event_time) AS event_time
      FROM pg_temp.{_STAGE} WHERE tx_type = 'migrate' GROUP BY mint) AS s
WHERE t.mint = s.mint AND t.migrated_at IS NULL
"""

_WRITER = "SELECT writer FROM token_event_writer WHERE publisher = $1 FOR SHARE"
_TAKE_WRITES = """
INSERT INTO token_event_writer (publisher, writer) VALUES ($1, $2)
ON CONFLICT (publisher) DO UPDATE SET writer = EXCLUDED.writer, changed_at = now()
"""
_REDRIVEN = "INSERT INTO token_event_redrives (event_id) VALUES ($1) ON CONFLICT DO NOTHING"
_REDRIVE_PUBLISHED = "SELECT published FROM token_event_redrives WHERE event_id = $1"
#: another event of the same publisher and mint stored with the seq
_SEQ_HOLDER = """
SELECT event_id FROM token_events
WHERE mint = $1 AND seq = $2 AND (source = $3 OR source LIKE $4) AND event_id <> $5
LIMIT 1
"""
_NOT_REDRIVEN = (
    "NOT EXISTS (SELECT 1 FROM token_event_redrives AS r WHERE r.event_id = token_events.event_id)"
)

#: rows older than $1 no longer needed: published by their publisher (the outbox position
#: of the service their source names; one with none yet begins at the end then), not an
#: unpublished redrive, and not the highest seq (the floor a restarted feed numbers a
#: returning mint above)
_PRUNABLE = """
event_time < $1
AND NOT EXISTS (SELECT 1 FROM token_event_outbox AS o
                WHERE token_events.id > o.last_id AND (token_events.source = o.publisher
                      OR token_events.source LIKE o.publisher || '/%'))
AND (seq IS NULL OR seq < (SELECT max(seq) FROM token_events))
AND NOT EXISTS (SELECT 1 FROM token_event_redrives AS r
                WHERE r.event_id = token_events.event_id AND NOT r.published)
"""
#: one batch of the oldest prunable rows, by the time index
_PRUNE_EVENTS = f"""
WITH gone AS (
    DELETE FROM token_events WHERE id IN (
        SELECT id FROM token_events WHERE {_PRUNABLE} ORDER BY event_time, id LIMIT $2
    ) RETURNING mint
)
SELECT count(*) AS events, coalesce(array_agg(DISTINCT mint), '{{}}') AS mints FROM gone
"""
#: a separate statement: one that deleted the events still sees them in its snapshot
_PRUNE_TOKENS = """
DELETE FROM tokens AS t WHERE t.mint = ANY($1::text[]) AND t.created_at < $2
AND NOT EXISTS (SELECT 1 FROM token_events AS e WHERE e.mint = t.mint)
"""
#: one pass over the rows older than $1; a token goes if every event of it older than $1
#: goes and it has none newer (an index range of each of its mints)
_PRUNABLE_COUNT = f"""
WITH older AS MATERIALIZED (
    SELECT mint, ({_PRUNABLE}) AS going FROM token_events WHERE event_time < $1
), by_mint AS (
    SELECT mint FROM older GROUP BY mint HAVING bool_and(going)
)
SELECT
    (SELECT count(*) FILTER (WHERE going) FROM older) AS events,
    (SELECT count(*) FILTER (WHERE NOT going) FROM older) AS held,
    (SELECT count(*) FROM by_mint JOIN tokens AS t USING (mint) WHERE t.created_at < $1
     AND NOT EXISTS (SELECT 1 FROM token_events AS e
                     WHERE e.mint = t.mint AND e.event_time >= $1)) AS tokens
"""
#: on-disk bytes of the table (rows, indexes, TOAST) and its rows as last counted
_TABLE_SIZE = """
SELECT pg_total_relation_size(c.oid) AS bytes, c.reltuples AS rows
FROM pg_class AS c WHERE c.oid = 'token_events'::regclass
"""

_TYPE_OF_TX = {
    "create": TokenCreated.TYPE,
    "buy": TokenTrade.TYPE,
    "sell": TokenTrade.TYPE,
    "migrate": TokenMigrated.TYPE,
}
_TOKEN_TYPES = frozenset(_TYPE_OF_TX.values())

#: errors caused by the rows themselves: bad data (SQLSTATE class 22), a broken
#: constraint (23), a value beyond a limit such as an index row over 8191 bytes (54),
#: and a value the client cannot encode for its column
_ROW_FAULTS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ClientDataError,
    OverflowError,
)


@dataclass(frozen=True, slots=True)
class Writer:
    """Who stores a publisher's numbered events: one holder at a time (the feed's lease
    holder, unique to its process)."""

    publisher: str
    holder: str


class Superseded(RuntimeError):
    """A write of a writer another took the publisher's writes over from: nothing of it
    is stored (its seqs may be the new writer's by now)."""

    def __init__(self, writer: Writer, current: str):
        super().__init__(
            f"{current} stores {writer.publisher}'s events now: {writer.holder}'s write "
            "is not stored"
        )
        self.writer = writer
        #: the writer now
        self.current = current


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteResult:
    """Outcome of one batch: rows inserted now and the highest row id among them."""

    inserted: int
    last_id: int | None
    #: ids of the batch's events that are stored as themselves; None means all of
    #: them. The others repeat an event stored before under another id (a duplicate
    #: frame after a restart): publishing them would deliver it twice.
    own_event_ids: frozenset[str] | None = None

    def to_publish(self, events: Sequence[Event]) -> list[Event]:
        """The events of the batch that are stored as themselves, in batch order."""
        if self.own_event_ids is None:
            return list(events)
        return [e for e in events if e.id in self.own_event_ids]


#: work done in a write's transaction once its rows are inserted
_AfterInsert = Callable[[asyncpg.Connection, "WriteResult"], Awaitable[object]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedriveWrite:
    """Outcome of storing a refused event again (``TokenEventStore.store_redriven``)."""

    #: stored by this call
    inserted: bool = False
    #: the event's row holds it (now or from an earlier redrive); False: another event
    #: holds its signature and txType, or ``seq_taken_by`` holds its seq
    stored: bool = False
    #: its redrive published it already
    published: bool = False
    #: id of another event of the publisher and mint stored with the same seq (the
    #: event cannot go out with it: consumers would drop one of the two)
    seq_taken_by: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """A replayed event with its exact frame and its row id (insertion order)."""

    event: Event
    frame: bytes
    row_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruned:
    """What a prune deleted, or a dry run would (``TokenEventStore.prune``)."""

    events: int
    #: tokens rows whose events all went
    tokens: int
    #: events older than the bound kept: not yet published, or the highest seq
    held: int = 0
    #: on-disk bytes of the events (rows, indexes, TOAST), by the table's mean per row;
    #: Postgres reuses them for new rows once vacuumed rather than giving them back
    bytes: int = 0


#: seconds a replay's fetch of a batch may take: the first one returns once Postgres
#: found the first rows in order, which for a replay of many mints in time order, or of
#: rows its filters pick few of, means reading (or sorting) much of the table first;
#: minutes on a history of many millions of rows, beyond a service command's bound, but
#: still bounded so that a replay meets a frozen server
REPLAY_FETCH_TIMEOUT_S = 600.0

_ORDERS = {
    "time": " ORDER BY event_time, id",
    "id": " ORDER BY id",
    "seq": " ORDER BY seq, id",
}


def _float(value: int | float | None) -> float | None:
    return None if value is None else float(value)


def _frame_text(event: Event, frame: bytes | str | None) -> str:
    if frame is None:
        return encode_payload(event.data).decode()
    return frame if isinstance(frame, str) else frame.decode()


def _stage_row(ord_: int, event: Event, frame: bytes | str | None) -> tuple:
    data = event.data
    kind = type(data)
    text = _frame_text(event, frame)
    if kind is TokenTrade:
        return (
            ord_, data.signature, data.txType, data.mint, event.time, event.seq, event.source,
            event.id, data.traderPublicKey, _float(data.solAmount), float(data.tokenAmount),
            float(data.vSolInBondingCurve), float(data.vTokensInBondingCurve),
            float(data.marketCapSol), text, None, None, None, None, data.pool, None,
            event.renumbered,
        )  # fmt: skip
    if kind is TokenCreated:
        return (
            ord_, data.signature, "create", data.mint, event.time, event.seq, event.source,
            event.id, data.traderPublicKey, _float(data.solAmount), float(data.initialBuy),
            float(data.vSolInBondingCurve), float(data.vTokensInBondingCurve),
            float(data.marketCapSol), text, data.name, data.symbol, data.uri,
            float(data.initialBuy), data.pool, data.is_mayhem_mode, event.renumbered,
        )  # fmt: skip
    if kind is TokenMigrated:
        return (
            ord_, data.signature, "migrate", data.mint, event.time, event.seq, event.source,
            event.id, None, None, None, None, None, None, text, None, None, None, None,
            data.pool, None, event.renumbered,
        )  # fmt: skip
    raise TypeError(f"not a token event: {event.type} ({kind.__name__})")


def _without_nul(row: tuple) -> tuple:
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)


class TokenEventStore:
    """Token events and tokens in Postgres (tables of migrations 0001, 0002, 0014, 0023)."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @staticmethod
    def rejects(exc: BaseException) -> bool:
        """True if a failed write refused its rows (retrying them fails again)."""
        return isinstance(exc, _ROW_FAULTS)

    async def write(
        self, events: Sequence[Event], frames: Sequence[bytes | str | None] | None = None
    ) -> int:
        """Store token events (with their exact frames, if given); return rows inserted.

        Idempotent: an event whose (signature, txType) is stored already is skipped.
        """
        return (await self.write_batch(events, frames)).inserted

    async def write_batch(
        self,
        events: Sequence[Event],
        frames: Sequence[bytes | str | None] | None = None,
        *,
        writer: Writer | None = None,
    ) -> WriteResult:
        """Store a batch in one transaction; return the count and the last row id.

        With ``writer``, refused (:class:`Superseded`) once another took its publisher's
        writes over.
        """
        if not events:
            return WriteResult(inserted=0, last_id=None)
        if frames is not None and len(frames) != len(events):
            raise ValueError(f"{len(events)} events but {len(frames)} frames")
        rows = [
            _stage_row(i, event, frames[i] if frames is not None else None)
            for i, event in enumerate(events)
        ]
        return await self._write(rows, writer=writer)

    async def take_writes(self, writer: Writer) -> None:
        """Make ``writer`` the one whose writes of its publisher's events are stored: a
        write naming another is refused from now on, and one that passed its check is
        committed before this returns."""
        await self._pool.execute(_TAKE_WRITES, writer.publisher, writer.holder)

    async def _write(
        self,
        rows: list[tuple],
        also: _AfterInsert | None = None,
        writer: Writer | None = None,
    ) -> WriteResult:
        """Insert staged rows in one transaction; ``also`` runs in it after the insert."""
        try:
            return await self._write_rows(rows, also, writer)
        except asyncpg.CharacterNotInRepertoireError:
            # a NUL inside a decoded string (names are free text); Postgres text cannot
            # hold it, so replace it in the columns; the frame keeps its escaped form
            return await self._write_rows([_without_nul(row) for row in rows], also, writer)

    async def _write_rows(
        self, rows: list[tuple], also: _AfterInsert | None, writer: Writer | None
    ) -> WriteResult:
        has_create = any(row[2] == "create" for row in rows)
        has_migrate = any(row[2] == "migrate" for row in rows)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _CREATE_STAGE if writer is None else f"{bound_idle_sql()}; {_CREATE_STAGE}"
            )
            # the pool's bound: a batch (the recorder's 2,000 rows, a load's 5,000) is
            # copied and inserted in well under a second
            await conn.copy_records_to_table(_STAGE, records=rows, columns=_STAGE_COLUMNS)
            result = await conn.fetchrow(_INSERT_EVENTS)
            own = None
            if result["inserted"] < len(rows):
                own = frozenset(await conn.fetchval(_OWN_EVENT_IDS))
            if has_create:
                await conn.execute(_INSERT_TOKENS)
            if has_migrate:
                await conn.execute(_MARK_MIGRATED)
            written = WriteResult(
                inserted=result["inserted"], last_id=result["last_id"], own_event_ids=own
            )
            if also is not None:
                await also(conn, written)
            if writer is not None:
                # last: the row stays locked from here to the commit only
                current = await conn.fetchval(_WRITER, writer.publisher)
                if current is not None and current != writer.holder:
                    raise Superseded(writer, current)
        return written

    async def store_redriven(self, event: Event, frame: bytes | str | None = None) -> RedriveWrite:
        """Store an event the store refused before, once; say whether it awaits publishing.

        Nothing is written when another event of its publisher and mint holds its seq.
        """
        publisher = source_service(event.source)
        if event.seq is not None:
            holder = await self._pool.fetchval(
                _SEQ_HOLDER, event.key, event.seq, publisher, publisher + "/%", event.id
            )
            if holder is not None:
                return RedriveWrite(seq_taken_by=holder)
        outcome: dict[str, bool] = {}

        async def record(conn: asyncpg.Connection, written: WriteResult) -> None:
            own = written.own_event_ids is None or event.id in written.own_event_ids
            outcome["stored"] = own
            if own:
                await conn.execute(_REDRIVEN, event.id)
                outcome["published"] = bool(await conn.fetchval(_REDRIVE_PUBLISHED, event.id))

        written = await self._write([_stage_row(0, event, frame)], record)
        return RedriveWrite(
            inserted=written.inserted == 1,
            stored=outcome["stored"],
            published=outcome.get("published", False),
        )

    async def mark_redrive_published(self, event_id: str) -> None:
        """Record that a redriven event is on the bus."""
        await self._pool.execute(
            "UPDATE token_event_redrives SET published = true WHERE event_id = $1", event_id
        )

    async def stream(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        mints: Iterable[str] | None = None,
        batch_size: int = 2_000,
    ) -> AsyncIterator[Event]:
        """Replay events with ``start <= time < end`` (of ``mints``) in time order."""
        async for stored in self.stream_stored(
            start=start, end=end, mints=mints, batch_size=batch_size
        ):
            yield stored.event

    async def stream_stored(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        mints: Iterable[str] | None = None,
        after_id: int | None = None,
        source_service: str | None = None,
        before_seq: int | None = None,
        order: str = "time",
        redriven: bool = True,
        batch_size: int = 2_000,
        fetch_timeout: float | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Replay stored events with their frames; ``order`` is "time", "id" or "seq".

        ``redriven=False`` leaves out events a redrive stored (and publishes itself).
        ``fetch_timeout`` bounds each fetch of ``batch_size`` rows (None: the pool's command
        timeout; a replay of the history gives :data:`REPLAY_FETCH_TIMEOUT_S`).
        """
        where: list[str] = []
        args: list[object] = []
        if start is not None:
            args.append(float(start))
            where.append(f"event_time >= ${len(args)}")
        if end is not None:
            args.append(float(end))
            where.append(f"event_time < ${len(args)}")
        if mints is not None:
            args.append(list(mints))
            where.append(f"mint = ANY(${len(args)}::text[])")
        if after_id is not None:
            args.append(int(after_id))
            where.append(f"id > ${len(args)}")
        if source_service is not None:
            args.append(source_service)
            args.append(source_service + "/%")
            where.append(f"(source = ${len(args) - 1} OR source LIKE ${len(args)})")
        if before_seq is not None:
            args.append(int(before_seq))
            where.append(f"seq < ${len(args)}")
        if not redriven:
            where.append(_NOT_REDRIVEN)
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {sorted(_ORDERS)}, not {order!r}")
        query = (
            "SELECT id, event_id, tx_type, mint, event_time, seq, source, renumbered,"
            " coalesce(frame, payload::text) AS frame FROM token_events"
            + (" WHERE " + " AND ".join(where) if where else "")
            + _ORDERS[order]
        )
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(query, *args, prefetch=batch_size, timeout=fetch_timeout):
                frame = row["frame"].encode()
                yield StoredEvent(
                    event=Event(
                        id=row["event_id"],
                        type=_TYPE_OF_TX[row["tx_type"]],
                        version=1,
                        source=row["source"],
                        time=row["event_time"],
                        key=row["mint"],
                        seq=row["seq"],
                        # the feed stamps a frame's arrival as its time
                        received_at=row["event_time"],
                        data=decode_token_frame(frame),
                        renumbered=row["renumbered"],
                    ),
                    frame=frame,
                    row_id=row["id"],
                )

    async def history(self, mint: str, source_service: str, before_seq: int) -> list[Event]:
        """``mint``'s events published by ``source_service`` before ``before_seq``, in seq
        order (what a consumer that lost a mint's record rebuilds it from)."""
        return [
            stored.event
            async for stored in self.stream_stored(
                mints=(mint,),
                source_service=source_service,
                before_seq=before_seq,
                order="seq",
                # one mint's rows, found by its index: each fetch is as short as any
                # command, so the pool's bound, and a rebuild meets a frozen server as
                # soon as a commit does; a long history is many fetches, none cut
                fetch_timeout=None,
            )
        ]

    async def max_seq(self) -> int:
        """The highest seq stored or refused for any mint (0: none); index lookups."""
        return (
            await self._pool.fetchval(
                "SELECT greatest((SELECT max(seq) FROM token_events),"
                " (SELECT max(seq) FROM token_event_refusals))"
            )
            or 0
        )

    async def last_row(self) -> int:
        """The id of the last row stored (0: none); an index lookup."""
        return await self._pool.fetchval("SELECT coalesce(max(id), 0) FROM token_events")

    async def created_after(self, row_id: int) -> list[str]:
        """The mints whose creation was stored, numbered, in a row after ``row_id``, in row
        order (a range of the primary key)."""
        rows = await self._pool.fetch(
            "SELECT mint FROM token_events WHERE id > $1 AND tx_type = 'create'"
            " AND seq IS NOT NULL ORDER BY id",
            int(row_id),
        )
        return [row["mint"] for row in rows]

    async def last_seq_by_mint(self, *, since: float | None = None) -> dict[str, int]:
        """Highest seq per mint stored or refused (events at or after ``since``), to
        restore a Sequencer: a refused seq is never given again."""
        after = " AND event_time >= $1" if since is not None else ""
        query = (
            "SELECT mint, max(seq) AS seq FROM ("
            f" SELECT mint, seq FROM token_events WHERE seq IS NOT NULL{after}"
            f" UNION ALL SELECT mint, seq FROM token_event_refusals WHERE true{after}"
            ") AS given GROUP BY mint"
        )
        args = [float(since)] if since is not None else []
        rows = await self._pool.fetch(query, *args)
        return {row["mint"]: row["seq"] for row in rows}

    async def record_refusal(self, event: Event) -> None:
        """Keep the seq of an event the store refused, so it is never given again."""
        if event.seq is None:
            return
        await self._pool.execute(
            "INSERT INTO token_event_refusals (event_id, mint, seq, source, event_time)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            event.id,
            event.key,
            event.seq,
            event.source,
            float(event.time),
        )

    async def count(self) -> int:
        return await self._pool.fetchval("SELECT count(*) FROM token_events")

    # -- retention ---------------------------------------------------------------------

    async def prune(
        self,
        before: float,
        *,
        batch_size: int = 5_000,
        dry_run: bool = False,
        on_batch: Callable[[Pruned], object] | None = None,
    ) -> Pruned:
        """Delete the events older than ``before`` (epoch seconds) that nothing needs.

        Kept whatever their age: an event its publisher has not yet confirmed on the
        bus (past its outbox position: a restart republishes it), a redriven one not yet
        published, and the highest seq stored. A token goes with the last of its events.
        Each batch of ``batch_size`` rows is a transaction of its own, so writes wait at
        most one batch for a row they touch; ``on_batch`` hears each batch. ``dry_run``
        deletes nothing and counts what would go.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        before = float(before)
        size = await self._pool.fetchrow(_TABLE_SIZE)
        rows = size["rows"] if size["rows"] > 0 else await self.count()
        per_row = size["bytes"] / rows if rows else 0.0
        if dry_run:
            found = await self._pool.fetchrow(_PRUNABLE_COUNT, before)
            return Pruned(
                events=found["events"],
                tokens=found["tokens"],
                held=found["held"],
                bytes=round(found["events"] * per_row),
            )
        events = tokens = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                gone = await conn.fetchrow(_PRUNE_EVENTS, before, batch_size)
                status = await conn.execute(_PRUNE_TOKENS, gone["mints"], before)
            batch = Pruned(
                events=gone["events"],
                tokens=int(status.split()[-1]),
                bytes=round(gone["events"] * per_row),
            )
            events += batch.events
            tokens += batch.tokens
            if on_batch is not None and batch.events:
                on_batch(batch)
            if batch.events < batch_size:
                break
        held = await self._pool.fetchval(
            "SELECT count(*) FROM token_events WHERE event_time < $1", before
        )
        return Pruned(events=events, tokens=tokens, held=held, bytes=round(events * per_row))

    # -- outbox: which stored events a publisher has confirmed on the bus ---------------

    async def outbox_position(self, publisher: str) -> int:
        """Last row id confirmed published; a new publisher starts at the current end."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO token_event_outbox (publisher, last_id)"
                " SELECT $1, coalesce(max(id), 0) FROM token_events"
                " ON CONFLICT (publisher) DO NOTHING",
                publisher,
            )
            return await conn.fetchval(
                "SELECT last_id FROM token_event_outbox WHERE publisher = $1", publisher
            )

    async def mark_published(self, publisher: str, last_id: int) -> None:
        """Record that rows up to ``last_id`` are on the bus."""
        await self._pool.execute(
            "INSERT INTO token_event_outbox (publisher, last_id) VALUES ($1, $2)"
            " ON CONFLICT (publisher) DO UPDATE"
            " SET last_id = greatest(token_event_outbox.last_id, EXCLUDED.last_id)",
            publisher,
            int(last_id),
        )


def feed_history(
    pool: asyncpg.Pool, publisher: str = "feed"
) -> Callable[[str, str, int], Awaitable[list[Event]]]:
    """A keyed consumer's history source: ``publisher``'s stored events of a mint."""
    store = TokenEventStore(pool)

    async def history(mint: str, source: str, before_seq: int) -> list[Event]:
        if source != publisher:
            return []  # only the feed's events are stored here
        return await store.history(mint, publisher, before_seq)

    return history


def is_token_event(event: Event) -> bool:
    return event.type in _TOKEN_TYPES
