"""The exit service's records: every exit order and its outcome, every graceful exit.

A graceful exit's tranche is stored before it is sent: after a crash the stored
tranches say which numbers each position has used (order ids
``<position_id>:exit:<n>``), so the resumed exit takes the next ones and trading, which
refuses an order id it has seen, never sells twice. A rule's sale is stored when it
settles. :class:`PostgresExitStore` is a deployment's (migrations 0006, 0008, 0010,
0015, 0016, 0027); :class:`MemoryExitStore` the embedded run's and the tests'.

A graceful exit keeps the ids of the operators' shutdown requests it applied
(:meth:`ExitStore.begin_run`, in the transaction that begins or joins it): a request
asked again under its id, whichever replica takes it and however long after, is that
run's, not a second graceful exit.

A graceful exit is finished when every position of every partition is: each replica
lists the partitions it has loaded and the positions it queued (:meth:`ExitStore.update_run`),
and closes each position as it is sold out (or as the deadline leaves it). The change
that leaves no partition unlisted and no position open finishes the run in the same
transaction, with the summary of every position, whichever replica makes it; a replica
that dies leaves its positions open until the next owner of its partitions sells them.

Placeholders keep the run open for what has not come to the exit service yet; each
is withdrawn, with no line in the summary, once it has:

- an entry order of trading still in flight (:func:`entry_position_id`): listed by the
  replica that saw it ordered, or by trading's barrier; withdrawn once the replica
  owning its mint has seen it refused, or filled and its position (listed in the same
  change, then sold);
- a position trading held when it halted entries (:func:`held_position_id`, from the
  barrier): withdrawn once the owner of its mint has seen it (listed with it, if held);
- trading's barrier itself (:data:`BARRIER`, listed with the run): withdrawn when the
  barrier comes, or when the wait for it is over.

Past the run's deadline every placeholder goes: a position trading held that no
replica ever saw is closed with an empty line (nothing sold, not completed), so the
summary counts it among the positions left.

A position trading closes by other means during the run is stored as closed
(:meth:`ExitStore.record_close`) before the state that applied the close is written: a
replica resumed after a crash reports it closed by trading (:func:`resume_state`),
however far its line had got. A close applied during the run is stored with the time
trading made it: one from before the run began (the exit's consumer was behind) with
nothing sold by the run is withdrawn from it, not reported.

The ids that ended at a token the exit retired (:meth:`ExitStore.record_ended`) are
stored before its retirement is: the token's state leaves memory and the partition's
index then, and a replica restarted since still withdraws a placeholder of one of them.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol

import msgspec

from pumpflow.common.db.transactions import holding_transaction
from pumpflow.common.events import ExitLine, OrderFilled, OrderRejected
from pumpflow.common.exit import DEADLINE, GRACEFUL, ExitRecord, GracefulExitSummary
from pumpflow.common.runtime.settings import SHUTDOWN_REQUESTS_KEPT_S

OrderState = Literal["sent", "filled", "rejected"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One graceful exit."""

    run_id: str
    reason: str
    started_at: float
    deadline: float
    #: partitions of the keyed consumer: each must list its positions before the end
    partitions: int = 1
    finished_at: float | None = None
    #: the summary's exit.report as JSON builtins
    summary: dict[str, Any] | None = None

    @classmethod
    def new(
        cls, reason: str, started_at: float, deadline: float, *, partitions: int = 1
    ) -> RunRecord:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        return cls(
            run_id=uuid.uuid4().hex,
            reason=reason,
            started_at=started_at,
            deadline=deadline,
            partitions=partitions,
        )

    def finished(self, time: float, lines: Iterable[ExitLine]) -> RunRecord:
        """This run finished at ``time`` with ``lines``, its summary made of them."""
        summary = GracefulExitSummary(
            reason=self.reason,
            started_at=self.started_at,
            finished_at=time,
            deadline=self.deadline,
            lines=tuple(lines),
        )
        # as JSON gives it back: the same whichever store it went through
        report = msgspec.json.decode(msgspec.json.encode(summary.report()))
        return replace(self, finished_at=time, summary=report)


#: a position of a run: still selling, sold out, or left unsold by the deadline; or an
#: entry's placeholder that was withdrawn
PositionState = Literal["open", "exited", "ended", "withdrawn"]

_ENTRY = "entry:"
_HELD = "held:"
#: the placeholder of trading's shutdown barrier, listed with every new run
BARRIER = "barrier:trading"
_PLACEHOLDERS = (_ENTRY, _HELD, BARRIER)


def entry_position_id(order_id: str) -> str:
    """The placeholder of entry order ``order_id`` among a run's positions."""
    return f"{_ENTRY}{order_id}"


def held_position_id(position_id: str) -> str:
    """The placeholder of a position trading held when it halted entries."""
    return f"{_HELD}{position_id}"


def unseen_line(placeholder: str, mint: str) -> ExitLine:
    """The line of a position trading held that no replica saw by the deadline."""
    return ExitLine(
        position_id=placeholder.removeprefix(_HELD),
        mint=mint,
        tokens_sold=0.0,
        sol_received=0.0,
        tranches=0,
        completed=False,
        reason=DEADLINE,
    )


def line_state(line: ExitLine) -> PositionState:
    return "exited" if line.completed else "ended"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitOrderRecord:
    """An exit order, with the exit it is part of and its outcome once known."""

    order_id: str
    mint: str
    position_id: str
    rule: str
    number: int
    token_amount: float
    sent_at: float
    tokens_at_start: float
    started_at: float
    mark_price: float | None = None
    run_id: str | None = None
    state: OrderState = "sent"
    filled_tokens: float | None = None
    sol_amount: float | None = None
    price: float | None = None
    fee_sol: float | None = None
    outcome: str = ""
    settled_at: float | None = None

    def settled(self, outcome: OrderFilled | OrderRejected, time: float) -> ExitOrderRecord:
        if isinstance(outcome, OrderFilled):
            return replace(
                self,
                state="filled",
                filled_tokens=outcome.token_amount,
                sol_amount=outcome.sol_amount,
                price=outcome.price,
                fee_sol=outcome.fee_sol,
                settled_at=time,
            )
        return replace(self, state="rejected", outcome=outcome.reason, settled_at=time)

    def fill(self) -> OrderFilled | None:
        if self.state != "filled":
            return None
        return OrderFilled(
            order_id=self.order_id,
            mint=self.mint,
            side="sell",
            token_amount=self.filled_tokens or 0.0,
            sol_amount=self.sol_amount or 0.0,
            price=self.price or 0.0,
            fee_sol=self.fee_sol or 0.0,
            position_id=self.position_id,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TradingClose:
    """Trading closed a position of a run by other means (a hand sale, a rule's sale
    that raced) before the exit sold it out."""

    mint: str
    reason: str
    time: float


def resume_state(
    orders: list[ExitOrderRecord], closes: Mapping[str, TradingClose] | None = None
) -> tuple[list[ExitRecord], dict[str, int]]:
    """A graceful exit's records as far as its stored tranches got, and the tranches
    each position id has sent (its numbers are taken). A tranche still without an
    outcome is unconfirmed: it may have sold, so its tokens are not offered again. A
    position trading closed (``closes``, by position id) ends closed by trading unless
    its tranches sold it out, one closed before its first tranche with nothing sold."""
    closes = closes or {}
    # by position: a later position on a mint has an exit of its own
    by_position: dict[str, list[ExitOrderRecord]] = defaultdict(list)
    sent: dict[str, int] = {}
    for order in sorted(orders, key=lambda o: (o.sent_at, o.number)):
        by_position[order.position_id].append(order)
        sent[order.position_id] = max(sent.get(order.position_id, 0), order.number)
    records = []
    for position_id, mine in by_position.items():
        first = mine[0]
        record = ExitRecord(
            mint=first.mint,
            position_id=position_id,
            rule=DEADLINE if any(o.rule == DEADLINE for o in mine) else GRACEFUL,
            # a refused rule's sale given back to the exit adds to it as it goes
            tokens_at_start=max(o.tokens_at_start for o in mine),
            mark_price=first.mark_price,
            started_at=first.started_at,
            unconfirmed={o.order_id: o.token_amount for o in mine if o.state == "sent"},
        )
        for order in mine:
            fill = order.fill()
            if fill is not None:
                record.add_fill(fill, order.settled_at or order.sent_at)
        finished = max(o.settled_at or o.sent_at for o in mine)
        close = closes.get(record.position_id)
        if close is not None and not record.sold_out:
            record.closed = close.reason
            finished = max(finished, close.time)
        if record.completed:
            record.finish(finished)
        records.append(record)
    for position_id, close in closes.items():
        if position_id in sent:
            continue
        record = ExitRecord(
            mint=close.mint,
            position_id=position_id,
            rule=GRACEFUL,
            tokens_at_start=0.0,
            mark_price=None,
            started_at=close.time,
            closed=close.reason,
        )
        record.finish(close.time)
        records.append(record)
    return records, sent


class ExitStore(Protocol):
    async def begin_run(self, run: RunRecord, *, request_id: str | None = None) -> RunRecord:
        """Store ``run`` unless a graceful exit is under way; the one under way. A
        ``request_id`` a run applied before gives that run, over or not; otherwise the
        run returned applies it. The requests of runs over longer than the store keeps
        them before ``run`` starts are forgotten (a copy of one is refused for its age:
        :meth:`~pumpflow.common.runtime.settings.CommonSettings.shutdown_too_old`)."""

    async def run_of_request(self, request_id: str) -> RunRecord | None:
        """The graceful exit that applied the operator's ``request_id``, if one did."""

    async def active_run(self) -> RunRecord | None: ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def latest_run(self) -> RunRecord | None: ...

    async def update_run(
        self,
        run_id: str,
        *,
        time: float,
        partitions: Iterable[int] = (),
        positions: Iterable[tuple[str, str]] = (),
        lines: Iterable[ExitLine] = (),
        entries: Mapping[str, Iterable[str]] | None = None,
        withdraw: Iterable[str] = (),
        overdue: bool = False,
    ) -> RunRecord | None:
        """List ``partitions`` and the ``positions`` (position id, mint) they hold and each
        mint's ``entries`` in flight (order ids, as placeholders), close the positions of
        ``lines``, withdraw the open placeholders (or positions: one trading closed
        before the run began, its close applied late) ``withdraw`` names and, ``overdue``
        (past the deadline), every placeholder; the run if this finished it (every
        partition listed, no position or placeholder open), at ``time`` with the summary
        of every line."""

    async def record_close(self, run_id: str, position_id: str, close: TradingClose) -> None:
        """Store that trading closed ``position_id``, a position of the run (listed with
        it if it is not yet)."""

    async def run_closes(self, run_id: str) -> dict[str, TradingClose]:
        """The positions of the run trading closed, by position id."""

    async def record_order(self, order: ExitOrderRecord) -> bool:
        """Store ``order`` unless its id is stored; whether it was new."""

    async def settle(
        self, order_id: str, outcome: OrderFilled | OrderRejected, time: float
    ) -> bool:
        """Store the outcome of a sent order; False if none was waiting for it."""

    async def run_orders(self, run_id: str) -> list[ExitOrderRecord]: ...

    async def orders(self, *, limit: int) -> list[dict[str, Any]]: ...

    async def record_ended(
        self, ended: Mapping[str, Iterable[str]], *, time: float, keep_s: float
    ) -> None:
        """Store the ids ``ended`` at each mint (mint -> ids) at ``time``; forget those
        stored more than ``keep_s`` before it."""

    async def ended_ids(self) -> set[str]:
        """Every id stored by :meth:`record_ended` and not forgotten yet."""


class MemoryExitStore:
    """The records in memory (a restart of the embedded run starts from nothing)."""

    def __init__(self, *, requests_kept_s: float = SHUTDOWN_REQUESTS_KEPT_S) -> None:
        self.requests_kept_s = requests_kept_s
        self.runs: dict[str, RunRecord] = {}
        self.exit_orders: dict[str, ExitOrderRecord] = {}
        self.run_partitions: dict[str, set[int]] = defaultdict(set)
        #: run id -> position id -> mint
        self.run_mints: dict[str, dict[str, str]] = defaultdict(dict)
        #: run id -> position id -> (state, line)
        self.run_positions: dict[str, dict[str, tuple[PositionState, ExitLine | None]]] = (
            defaultdict(dict)
        )
        #: id -> (mint, stored at) of the ids ended at retired tokens
        self.ended: dict[str, tuple[str, float]] = {}
        #: run id -> position id -> trading's close of it
        self.closes: dict[str, dict[str, TradingClose]] = defaultdict(dict)
        #: operator's shutdown request id -> the run that applied it
        self.requests: dict[str, str] = {}

    async def begin_run(self, run: RunRecord, *, request_id: str | None = None) -> RunRecord:
        before = run.started_at - self.requests_kept_s
        for applied, run_id in list(self.requests.items()):
            finished = self.runs[run_id].finished_at
            if finished is not None and finished < before:
                del self.requests[applied]
        if request_id is not None and request_id in self.requests:
            return self.runs[self.requests[request_id]]
        begun = await self.active_run()
        if begun is None:
            begun = self.runs[run.run_id] = run
            self.run_positions[run.run_id][BARRIER] = ("open", None)
            self.run_mints[run.run_id][BARRIER] = ""
        if request_id is not None:
            self.requests[request_id] = begun.run_id
        return begun

    async def run_of_request(self, request_id: str) -> RunRecord | None:
        run_id = self.requests.get(request_id)
        return None if run_id is None else self.runs[run_id]

    async def active_run(self) -> RunRecord | None:
        return next((r for r in self.runs.values() if r.finished_at is None), None)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return self.runs.get(run_id)

    async def latest_run(self) -> RunRecord | None:
        return max(self.runs.values(), key=lambda r: r.started_at, default=None)

    async def update_run(
        self,
        run_id: str,
        *,
        time: float,
        partitions: Iterable[int] = (),
        positions: Iterable[tuple[str, str]] = (),
        lines: Iterable[ExitLine] = (),
        entries: Mapping[str, Iterable[str]] | None = None,
        withdraw: Iterable[str] = (),
        overdue: bool = False,
    ) -> RunRecord | None:
        run = self.runs[run_id]
        held = self.run_positions[run_id]
        mints = self.run_mints[run_id]
        for position_id, mint in [*positions, *_entry_placeholders(entries)]:
            held.setdefault(position_id, ("open", None))
            mints.setdefault(position_id, mint)
        for position_id in withdraw:
            if held.get(position_id, ("",))[0] == "open":
                held[position_id] = ("withdrawn", None)
        for line in lines:
            if held.get(line.position_id, ("open", None))[0] != "exited":
                held[line.position_id] = (line_state(line), line)
        if overdue:
            for position_id, (state, _line) in list(held.items()):
                if state != "open" or not position_id.startswith(_PLACEHOLDERS):
                    continue
                real = position_id.removeprefix(_HELD)
                if position_id.startswith(_HELD) and real not in held:
                    line = unseen_line(position_id, mints[position_id])
                    held[position_id] = ("ended", line)
                else:
                    held[position_id] = ("withdrawn", None)
        self.run_partitions[run_id].update(partitions)
        if (
            run.finished_at is not None
            or len(self.run_partitions[run_id]) < run.partitions
            or any(state == "open" for state, _ in held.values())
        ):
            return None
        self.runs[run_id] = run.finished(time, (line for _, line in held.values() if line))
        return self.runs[run_id]

    async def record_close(self, run_id: str, position_id: str, close: TradingClose) -> None:
        self.run_positions[run_id].setdefault(position_id, ("open", None))
        self.run_mints[run_id].setdefault(position_id, close.mint)
        self.closes[run_id][position_id] = close

    async def run_closes(self, run_id: str) -> dict[str, TradingClose]:
        return dict(self.closes.get(run_id, {}))

    async def record_order(self, order: ExitOrderRecord) -> bool:
        if order.order_id in self.exit_orders:
            return False
        self.exit_orders[order.order_id] = order
        return True

    async def settle(
        self, order_id: str, outcome: OrderFilled | OrderRejected, time: float
    ) -> bool:
        order = self.exit_orders.get(order_id)
        if order is None or order.state != "sent":
            return False
        self.exit_orders[order_id] = order.settled(outcome, time)
        return True

    async def run_orders(self, run_id: str) -> list[ExitOrderRecord]:
        return [o for o in self.exit_orders.values() if o.run_id == run_id]

    async def orders(self, *, limit: int) -> list[dict[str, Any]]:
        found = sorted(self.exit_orders.values(), key=lambda o: o.sent_at, reverse=True)
        return [asdict(o) for o in found[:limit]]

    async def record_ended(
        self, ended: Mapping[str, Iterable[str]], *, time: float, keep_s: float
    ) -> None:
        for mint, ids in ended.items():
            for ended_id in ids:
                self.ended[ended_id] = (mint, time)
        for ended_id, (_mint, stored_at) in list(self.ended.items()):
            if stored_at < time - keep_s:
                del self.ended[ended_id]

    async def ended_ids(self) -> set[str]:
        return set(self.ended)


_ORDER_COLUMNS = tuple(ExitOrderRecord.__dataclass_fields__)
_INSERT_ORDER = (
    f"INSERT INTO exit_orders ({', '.join(_ORDER_COLUMNS)}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, len(_ORDER_COLUMNS) + 1))}) "
    "ON CONFLICT (order_id) DO NOTHING RETURNING order_id"
)
_SETTLE = """
UPDATE exit_orders SET state = $2, filled_tokens = $3, sol_amount = $4, price = $5,
    fee_sol = $6, outcome = $7, settled_at = $8
WHERE order_id = $1 AND state = 'sent' RETURNING order_id
"""
_RUN_COLUMNS = (
    "run_id, reason, started_at, deadline, partitions, finished_at, summary::text AS summary"
)


#: the requests of runs over before $1 (clock seconds)
_FORGET_REQUESTS = """
DELETE FROM exit_run_requests r USING exit_runs x
WHERE r.run_id = x.run_id AND x.finished_at < $1
"""


class _AppliedMeanwhile(Exception):
    """The operator's request was applied by another replica's transaction meanwhile."""


def _run(row: Any) -> RunRecord | None:
    if row is None:
        return None
    summary = row["summary"]
    return RunRecord(
        run_id=row["run_id"],
        reason=row["reason"],
        started_at=row["started_at"],
        deadline=row["deadline"],
        partitions=row["partitions"],
        finished_at=row["finished_at"],
        summary=json.loads(summary) if summary is not None else None,
    )


class PostgresExitStore:
    """The records in Postgres (migrations 0006, 0008, 0010, 0015, 0016, 0027), in the
    pool's schema."""

    def __init__(self, pool: Any, *, requests_kept_s: float = SHUTDOWN_REQUESTS_KEPT_S):
        self.pool = pool
        self.requests_kept_s = requests_kept_s

    async def begin_run(self, run: RunRecord, *, request_id: str | None = None) -> RunRecord:
        # the table grows with the runs begun alone: forgotten here, a few rows a week
        await self.pool.execute(_FORGET_REQUESTS, run.started_at - self.requests_kept_s)
        while True:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if request_id is not None:
                        applied = await self._run_of_request(conn, request_id)
                        if applied is not None:
                            return applied
                    stored = await conn.fetchval(
                        "INSERT INTO exit_runs (run_id, reason, started_at, deadline, "
                        "partitions) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING "
                        "RETURNING run_id",
                        run.run_id, run.reason, run.started_at, run.deadline, run.partitions,
                    )  # fmt: skip
                    if stored is not None:
                        await conn.execute(
                            "INSERT INTO exit_run_positions (run_id, position_id, mint) "
                            "VALUES ($1, $2, '')",
                            run.run_id, BARRIER,
                        )  # fmt: skip
                        if not await self._applies(conn, request_id, run.run_id):
                            raise _AppliedMeanwhile(request_id)
                        return run
            except _AppliedMeanwhile:
                continue  # rolled back: the next round reads the run that applied it
            # refused for the run under way (or stored by a try whose reply was lost)
            active = await self.active_run() or await self.get_run(run.run_id)
            if active is not None:
                async with self.pool.acquire() as conn:
                    if await self._applies(conn, request_id, active.run_id):
                        return active
            # the run under way finished before it was read: this one begins after all; or
            # another replica's run applied the request meanwhile: the next round reads it

    @staticmethod
    async def _applies(conn: Any, request_id: str | None, run_id: str) -> bool:
        """Store that ``run_id`` applies the operator's ``request_id``; False when
        another run applied it first."""
        if request_id is None:
            return True
        recorded = await conn.fetchval(
            "INSERT INTO exit_run_requests (request_id, run_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING run_id",
            request_id, run_id,
        )  # fmt: skip
        return recorded is not None

    async def run_of_request(self, request_id: str) -> RunRecord | None:
        async with self.pool.acquire() as conn:
            return await self._run_of_request(conn, request_id)

    @staticmethod
    async def _run_of_request(conn: Any, request_id: str) -> RunRecord | None:
        return _run(
            await conn.fetchrow(
                f"SELECT {_RUN_COLUMNS} FROM exit_runs JOIN exit_run_requests USING (run_id) "
                "WHERE request_id = $1",
                request_id,
            )
        )

    async def active_run(self) -> RunRecord | None:
        async with self.pool.acquire() as conn:
            return _run(
                await conn.fetchrow(
                    f"SELECT {_RUN_COLUMNS} FROM exit_runs WHERE finished_at IS NULL"
                )
            )

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self.pool.acquire() as conn:
            return _run(
                await conn.fetchrow(
                    f"SELECT {_RUN_COLUMNS} FROM exit_runs WHERE run_id = $1", run_id
                )
            )

    async def latest_run(self) -> RunRecord | None:
        async with self.pool.acquire() as conn:
            return _run(
                await conn.fetchrow(
                    f"SELECT {_RUN_COLUMNS} FROM exit_runs ORDER BY started_at DESC LIMIT 1"
                )
            )

    async def update_run(
        self,
        run_id: str,
        *,
        time: float,
        partitions: Iterable[int] = (),
        positions: Iterable[tuple[str, str]] = (),
        lines: Iterable[ExitLine] = (),
        entries: Mapping[str, Iterable[str]] | None = None,
        withdraw: Iterable[str] = (),
        overdue: bool = False,
    ) -> RunRecord | None:
        positions = [*positions, *_entry_placeholders(entries)]
        partitions, withdraw = list(partitions), list(withdraw)
        lines = [
            (line.position_id, line_state(line), _encode_line(line).decode()) for line in lines
        ]
        async with self.pool.acquire() as conn, holding_transaction(conn):
            # one change at a time per run: the one that leaves nothing open sees so
            run = _run(
                await conn.fetchrow(
                    f"SELECT {_RUN_COLUMNS} FROM exit_runs WHERE run_id = $1 FOR UPDATE", run_id
                )
            )
            if run is None:
                raise KeyError(f"no graceful exit {run_id!r}")
            if positions:
                await conn.executemany(
                    "INSERT INTO exit_run_positions (run_id, position_id, mint) "
                    "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    [(run_id, position_id, mint) for position_id, mint in positions],
                )
            if withdraw:
                await conn.execute(
                    "UPDATE exit_run_positions SET state = 'withdrawn', closed_at = $2 "
                    "WHERE run_id = $1 AND state = 'open' AND position_id = ANY($3::text[])",
                    run_id, time, withdraw,
                )  # fmt: skip
            if lines:
                await conn.executemany(
                    "UPDATE exit_run_positions SET state = $3, line = $4::jsonb, closed_at = $5 "
                    "WHERE run_id = $1 AND position_id = $2 AND state <> 'exited'",
                    [(run_id, *line, time) for line in lines],
                )
            if overdue:
                await self._close_placeholders(conn, run_id, time)
            if partitions:
                await conn.executemany(
                    "INSERT INTO exit_run_partitions (run_id, partition) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING",
                    [(run_id, partition) for partition in partitions],
                )
            if run.finished_at is not None:
                return None
            listed = await conn.fetchval(
                "SELECT count(*) FROM exit_run_partitions WHERE run_id = $1", run_id
            )
            still_open = await conn.fetchval(
                "SELECT count(*) FROM exit_run_positions WHERE run_id = $1 AND state = 'open'",
                run_id,
            )
            if listed < run.partitions or still_open:
                return None
            rows = await conn.fetch(
                "SELECT line::text AS line FROM exit_run_positions "
                "WHERE run_id = $1 AND line IS NOT NULL ORDER BY closed_at, position_id",
                run_id,
            )
            finished = run.finished(time, (_decode_line(row["line"]) for row in rows))
            await conn.execute(
                "UPDATE exit_runs SET finished_at = $2, summary = $3::jsonb WHERE run_id = $1",
                run_id, time, json.dumps(finished.summary),
            )  # fmt: skip
            return finished

    @staticmethod
    async def _close_placeholders(conn: Any, run_id: str, time: float) -> None:
        """Past the deadline: every placeholder withdrawn, but a held position no replica
        listed, which ends with its empty line."""
        unseen = await conn.fetch(
            "SELECT p.position_id, p.mint FROM exit_run_positions p WHERE p.run_id = $1 "
            "AND p.state = 'open' AND starts_with(p.position_id, $2) AND NOT EXISTS ("
            "SELECT 1 FROM exit_run_positions q WHERE q.run_id = $1 "
            "AND q.position_id = substr(p.position_id, $3))",
            run_id, _HELD, len(_HELD) + 1,
        )  # fmt: skip
        if unseen:
            await conn.executemany(
                "UPDATE exit_run_positions SET state = 'ended', line = $3::jsonb, closed_at = $4 "
                "WHERE run_id = $1 AND position_id = $2",
                [
                    (run_id, row["position_id"],
                     _encode_line(unseen_line(row["position_id"], row["mint"])).decode(), time)
                    for row in unseen
                ],
            )  # fmt: skip
        await conn.execute(
            "UPDATE exit_run_positions SET state = 'withdrawn', closed_at = $2 "
            "WHERE run_id = $1 AND state = 'open' AND (starts_with(position_id, $3) "
            "OR starts_with(position_id, $4) OR position_id = $5)",
            run_id, time, _ENTRY, _HELD, BARRIER,
        )  # fmt: skip

    async def record_close(self, run_id: str, position_id: str, close: TradingClose) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO exit_run_positions (run_id, position_id, mint, trading_closed, "
                "trading_closed_at) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (run_id, position_id) DO UPDATE SET "
                "trading_closed = excluded.trading_closed, "
                "trading_closed_at = excluded.trading_closed_at",
                run_id, position_id, close.mint, close.reason, close.time,
            )  # fmt: skip

    async def run_closes(self, run_id: str) -> dict[str, TradingClose]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT position_id, mint, trading_closed, trading_closed_at "
                "FROM exit_run_positions WHERE run_id = $1 AND trading_closed IS NOT NULL",
                run_id,
            )
        return {
            row["position_id"]: TradingClose(
                mint=row["mint"], reason=row["trading_closed"], time=row["trading_closed_at"]
            )
            for row in rows
        }

    async def record_order(self, order: ExitOrderRecord) -> bool:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                _INSERT_ORDER, *(getattr(order, name) for name in _ORDER_COLUMNS)
            )
        return row is not None

    async def settle(
        self, order_id: str, outcome: OrderFilled | OrderRejected, time: float
    ) -> bool:
        if isinstance(outcome, OrderFilled):
            values = ("filled", outcome.token_amount, outcome.sol_amount, outcome.price,
                      outcome.fee_sol, "")  # fmt: skip
        else:
            values = ("rejected", None, None, None, None, outcome.reason)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_SETTLE, order_id, *values, time)
        return row is not None

    async def run_orders(self, run_id: str) -> list[ExitOrderRecord]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {', '.join(_ORDER_COLUMNS)} FROM exit_orders WHERE run_id = $1", run_id
            )
        return [ExitOrderRecord(**dict(row)) for row in rows]

    async def orders(self, *, limit: int) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {', '.join(_ORDER_COLUMNS)} FROM exit_orders "
                "ORDER BY sent_at DESC LIMIT $1",
                limit,
            )
        return [dict(row) for row in rows]

    async def record_ended(
        self, ended: Mapping[str, Iterable[str]], *, time: float, keep_s: float
    ) -> None:
        rows = [(ended_id, mint, time) for mint, ids in ended.items() for ended_id in ids]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO exit_ended (id, mint, stored_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO UPDATE SET mint = excluded.mint, "
                "stored_at = excluded.stored_at",
                rows,
            )
            await conn.execute("DELETE FROM exit_ended WHERE stored_at < $1", time - keep_s)

    async def ended_ids(self) -> set[str]:
        async with self.pool.acquire() as conn:
            return {row["id"] for row in await conn.fetch("SELECT id FROM exit_ended")}


def _entry_placeholders(entries: Mapping[str, Iterable[str]] | None) -> list[tuple[str, str]]:
    return [(entry_position_id(o), mint) for mint, ids in (entries or {}).items() for o in ids]


_encode_line = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(ExitLine).decode
