"""GracefulExitManager: sells every open position by a deadline, in tranches, in order.

Collaborators come by injection: the event bus (anything with ``publish``), the
position manager (its ``open_positions`` by mint) and the trade executor (an
``execute_exit`` of one tranche's :class:`~pumpflow.common.events.ExitOrder`,
answering its fill, its refusal, or None: no outcome came). The plan is
:class:`~.planner.ExitPlanner`'s; this class runs it on the injected clock and
publishes an ``exit.report`` per position as it is sold out and a summary
(``graceful``) at the end (unless the caller sums the exits of several managers
itself: ``publish_summary=False``; ``on_exited`` is told each position sold out).

A rule's sale ordered before the exit began holds its tokens back (the position's
``pending_tokens``): the position is not sold out until that sale settles, and what it
did not sell (refused, or filled short) the exit sells too
(:meth:`GracefulExitManager.on_rule_outcome`).

A tranche without an outcome may have sold: its tokens are unconfirmed, never offered
again (a new order could sell them twice), while the position's other tokens go on
selling. Its outcome, should it come later, settles them
(:meth:`GracefulExitManager.on_late_outcome`): a fill counts, a refusal gives them back
to sell. The exit waits for it to the deadline at most; each position's report says
what is still unconfirmed then.

A position trading closes by other means (a hand sale, a rule's sale that raced) leaves
the plan with :meth:`GracefulExitManager.on_closed`: no more tranches; its report says
it was closed, and why. One trading closed before the exit began (the close came late)
was never the exit's: unless the exit sold some of it, it leaves with no report
(``on_withdrawn`` is told).

A position held with nothing to sell (no token, none a rule's sale holds) is the
exit's all the same: queued closed, "nothing to sell", its exit over at once and its
line in the report (left out, it would stay held and never taken up, however often
looked at).

A position another seller takes over (its partition moved to another replica) leaves
this exit with :meth:`GracefulExitManager.hand_over`: no more tranches, no report here.

A mint holds one position at a time, yet another may open on it during the exit (an
entry in flight as it began fills after the first is sold out or closed): once the
first's exit is over, the next look (:meth:`GracefulExitManager.begin_graceful_exit`)
queues the later one in its place, with an exit and a report of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pumpflow.common.clock import Clock, first_of
from pumpflow.common.curve import CurveState
from pumpflow.common.events import (
    Event,
    ExitOrder,
    LifecycleState,
    OrderFilled,
    OrderRejected,
    Payload,
    make_event,
)
from pumpflow.common.exit.planner import (
    DEADLINE,
    GRACEFUL,
    ExitPlanner,
    GracefulExitConfig,
    HeldPosition,
    PlannedTranche,
    QueuedExit,
)
from pumpflow.common.exit.report import ExitRecord, GracefulExitSummary

log = logging.getLogger(__name__)


class Publisher(Protocol):
    async def publish(self, event: Event) -> None: ...


class OpenPositions(Protocol):
    """The position manager as the exit reads it (trading's ``PositionBook`` fits)."""

    @property
    def open_positions(self) -> Mapping[str, HeldPosition]: ...


class ExitExecutor(Protocol):
    """Sells one tranche and waits: answers the fill, the refusal with its reason, or
    None when no outcome came in time (the sale may have gone through)."""

    async def execute_exit(self, order: ExitOrder) -> OrderFilled | OrderRejected | None: ...


WaitUntil = Callable[[float], Awaitable[None]]
ExitedHook = Callable[[ExitRecord], Awaitable[None]]
WithdrawnHook = Callable[[ExitRecord], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitProgress:
    """Where a graceful exit stands."""

    started: bool
    done: bool
    positions: int
    sold_out: int
    in_flight: int
    #: tranches given up for lost whose outcome has not come, and their tokens
    unconfirmed_tranches: int
    unconfirmed_tokens: float
    tranches: int
    #: tokens the exit itself sells (rule sales' tokens held back not counted)
    tokens_at_start: float
    tokens_left: float
    sol_recovered: float
    elapsed_s: float
    #: seconds left to the deadline (negative once past it)
    deadline_margin_s: float
    #: tokens rule sales ordered before the exit began hold back, awaiting their outcome
    pending_tokens: float = 0.0


class GracefulExitManager:
    """Runs a graceful exit of every open position; see the module docstring."""

    def __init__(
        self,
        event_bus: Publisher,
        position_manager: OpenPositions,
        trade_executor: ExitExecutor,
        *,
        clock: Clock,
        config: GracefulExitConfig | None = None,
        source: str = "exit",
        wait_until: WaitUntil | None = None,
        publish_summary: bool = True,
        on_exited: ExitedHook | None = None,
        on_withdrawn: WithdrawnHook | None = None,
    ) -> None:
        self.event_bus = event_bus
        self.position_manager = position_manager
        self.trade_executor = trade_executor
        self.clock = clock
        self.planner = ExitPlanner(config or GracefulExitConfig())
        self.source = source
        self._wait_until = wait_until or self._wait_on_clock
        self.publish_summary = publish_summary
        self.on_exited = on_exited
        self.on_withdrawn = on_withdrawn
        #: set when a rule's sale settles: the run's wait for it ends
        self._changed = asyncio.Event()
        self.reason = ""
        #: mint -> the exit of its latest position queued
        self.records: dict[str, ExitRecord] = {}
        #: exits over of positions a later one on their mint took the place of
        self.earlier: list[ExitRecord] = []
        self.summary: GracefulExitSummary | None = None
        #: mint -> its market as last reported, and whether that counts this exit's sales
        self._markets: dict[str, tuple[CurveState, bool]] = {}
        self._lifecycles: dict[str, tuple[LifecycleState, float | None]] = {}
        #: position id -> tranches sent before a restart (their numbers are taken)
        self._sent: dict[str, int] = {}
        #: mints handed over to another seller: never queued again by this manager
        self._handed: set[str] = set()
        #: position ids closed before the exit began: out of it once their exit is over
        self._withdrawing: set[str] = set()
        #: exits of positions closed before the exit began, out of it
        self.withdrawn: list[ExitRecord] = []

    # ---------------------------------------------------------------- inputs

    @property
    def accepting_entries(self) -> bool:
        """False from the moment a graceful exit begins."""
        return self.planner.started_at is None

    def on_market(self, mint: str, state: CurveState, *, follows_sales: bool = False) -> None:
        """The token's curve (or pool) as its latest trade reports it (counting this
        exit's own sales, if ``follows_sales``: a pool followed through their fills);
        re-prioritises."""
        self._markets[mint] = (state, follows_sales)
        self.planner.update_market(mint, state, follows_sales=follows_sales)
        queued, record = self.planner.exits.get(mint), self.records.get(mint)
        if record is not None and record.mark_price is None and queued is not None:
            # queued with no mark: the plan's first report is the mark slippage is against
            if queued.position_id == record.position_id:
                record.mark_price = queued.mark_price

    def on_lifecycle(
        self, mint: str, state: LifecycleState, activity_level: float | None = None
    ) -> None:
        self._lifecycles[mint] = (state, activity_level)
        self.planner.update_lifecycle(mint, state, activity_level)

    # ---------------------------------------------------------------- the exit

    @property
    def exit_queue(self) -> list[QueuedExit]:
        """Positions still to sell, the next first (as last prioritised)."""
        return [self.planner.exits[mint] for _, _, mint in sorted(self.planner.queue)]

    def begin_graceful_exit(
        self, reason: str = "shutdown", *, deadline: float | None = None
    ) -> int:
        """Queue every open position (once, however often called); how many are queued."""
        now = self.clock.now()
        if self.planner.started_at is None:
            self.reason = reason
            self.planner.begin(now, deadline=deadline)
        for position in list(self.position_manager.open_positions.values()):
            if position.mint in self._handed:
                continue
            before = self.planner.exits.get(position.mint)
            lifecycle, level = self._lifecycles.get(position.mint, (None, None))
            state, follows_sales = self._markets.get(position.mint, (None, False))
            queued = self.planner.add(
                position,
                state=state,
                follows_sales=follows_sales,
                lifecycle=lifecycle,
                activity_level=level or 0.0,
            )
            if queued is None:
                continue
            if queued is not before:
                # come while the run waits for its next tranche: it sells from now
                self._changed.set()
            if queued.tranches_sent < self._sent.get(queued.position_id, 0):
                queued.tranches_sent = self._sent[queued.position_id]
            record = self.records.get(queued.mint)
            if record is not None and record.position_id != queued.position_id:
                self._supersede(record, now)
                record = None
            if record is None:
                self.records[queued.mint] = ExitRecord(
                    mint=queued.mint,
                    position_id=queued.position_id,
                    rule=GRACEFUL,
                    tokens_at_start=queued.tokens_at_start,
                    mark_price=queued.mark_price,
                    started_at=now,
                    # nothing to sell: over as it is queued, closed with its reason
                    closed=queued.closed,
                    pending_tokens=queued.reserved,
                )
            else:
                self._held_back(record, queued)
                # a resumed exit's tranches still without an outcome are not offered again
                unanswered = record.unconfirmed
                self.planner.hold_unconfirmed(
                    queued.mint, sum(unanswered.values()), len(unanswered)
                )
        self.prioritize_exits()
        return len(self.planner.exits)

    def resume_graceful_exit(
        self,
        reason: str,
        *,
        started_at: float,
        deadline: float,
        records: Iterable[ExitRecord] = (),
        sent: Mapping[str, int] | None = None,
    ) -> int:
        """Take up a graceful exit begun before a restart; how many positions are queued.

        ``records`` are the exits as far as they got (their fills stay in the reports);
        ``sent`` the tranches each position id sent, so the next tranche takes the next
        number and no order id is used twice. What is still held is queued again. Called
        again as positions come (a partition taken over), with the records as they are
        then: an exit already here keeps its own, one handed over stays the other's. Of
        two positions on a mint the later one's exit is the mint's.
        """
        if self.planner.started_at is None:
            self.reason = reason
            self.planner.begin(started_at, deadline=deadline)
        now = self.clock.now()
        for record in sorted(records, key=lambda r: r.started_at):
            if record.mint in self._handed or self.took_up(record.mint, record.position_id):
                continue
            current = self.records.get(record.mint)
            if current is not None and current.started_at > record.started_at:
                self.earlier.append(record)
                continue
            queued = self.planner.exits.get(record.mint)
            if queued is not None and not queued.done:
                continue  # the mint's exit goes on: the later one is taken up once it is over
            if current is not None:
                self._supersede(current, now)
            self.records[record.mint] = record
        self._sent.update(sent or {})
        return self.begin_graceful_exit(reason)

    def untaken(self) -> list[str]:
        """Mints held and not queued by this exit (nor handed over), or queued with an
        earlier position: positions it has not taken up yet."""
        queued = self.planner.exits
        return [m for m, p in self.position_manager.open_positions.items()
                if m not in self._handed
                and (m not in queued or queued[m].position_id != p.position_id)]  # fmt: skip

    def took_up(self, mint: str, position_id: str) -> bool:
        """Whether this exit has (or had) ``mint``'s position ``position_id``."""
        return any(r.mint == mint and r.position_id == position_id for r in self.all_records())

    def all_records(self) -> list[ExitRecord]:
        """Every position's exit here: those a later position took the place of first."""
        return [*self.earlier, *self.records.values()]

    def prioritize_exits(self) -> list[QueuedExit]:
        """Score every position left and reorder the queue."""
        return self.planner.prioritize(self.clock.now())

    async def execute_next_exit(self) -> PlannedTranche | None:
        """Sell the next tranche due now; None if no position is ready."""
        tranche = self.planner.next_tranche(self.clock.now())
        if tranche is not None:
            await self._execute(tranche)
        return tranche

    async def run(self) -> GracefulExitSummary:
        """Sell until every position is sold or the deadline passed; the summary.

        Tranches of different tokens go out together, up to ``max_orders_in_flight``
        (a token's tranches one after the other); each answer frees its place for the
        next tranche due, so an order waiting long for its outcome holds back no other
        token's.
        """
        if self.planner.started_at is None:
            self.begin_graceful_exit()
        limit = self.planner.config.max_orders_in_flight
        flying: set[asyncio.Future[None]] = set()
        try:
            while not self.planner.done or flying:
                now = self.clock.now()
                while len(flying) < limit:
                    tranche = self.planner.next_tranche(now)
                    if tranche is None:
                        break
                    flying.add(asyncio.ensure_future(self._execute(tranche)))
                when = self._next_wake(now, answers=bool(flying)) if len(flying) < limit else None
                if when is None and not flying:
                    break
                waits = [self._wait_until(when)] if when is not None else []
                if flying:
                    waits.append(asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED))
                await self._wait_for_change(*waits)
                for task in [t for t in flying if t.done()]:
                    flying.discard(task)
                    task.result()
        finally:
            for task in flying:
                task.cancel()
        return await self._finish(force=True)

    def _next_wake(self, now: float, *, answers: bool) -> float | None:
        """When a tranche may be due next, by the deadline; None if none may come (or,
        with ``answers`` to come, none but what they bring: each answer looks again)."""
        deadline = self.planner.deadline
        when = self.planner.next_ready_at()
        awaiting = not answers and self.planner.awaiting_outcomes
        if when is None and awaiting and deadline is not None:
            # a rule's sale, or a tranche given up for lost, may yet be refused and
            # give its tokens back to sell
            when = deadline if now < deadline else None
        if when is None or (deadline is not None and when > deadline):
            return None
        return when

    def hand_over(self, mint: str) -> bool:
        """``mint``'s position is another seller's now: out of the plan and the reports,
        for good (the tranche in flight, if any, is given up; the other seller waits for
        its outcome). Whether it was queued here."""
        self._handed.add(mint)
        dropped = self.planner.drop(mint) is not None
        self.records.pop(mint, None)
        self._changed.set()
        return dropped

    async def on_rule_outcome(
        self,
        mint: str,
        outcome: OrderFilled | OrderRejected,
        tokens: float,
        *,
        held_back: float,
        rule: str,
    ) -> None:
        """A rule's sale (``rule``) of ``tokens`` ordered before the exit began settled,
        and the position's rule sales hold back ``held_back`` after it: the tokens it sold
        are gone; those it did not sell (refused, or filled short) the exit sells, unless
        the others still under way hold them (the position is never left open)."""
        queued = self.planner.exits.get(mint)
        record = self.records.get(mint)
        if queued is None or record is None or self.summary is not None:
            return
        sold = outcome.token_amount if isinstance(outcome, OrderFilled) else 0.0
        if sold > 0:
            record.sold_by_rule = rule
        record.tokens_at_start += self.planner.settle_reserved(
            mint, tokens, sold=sold, held_back=held_back
        )
        self._held_back(record, queued)
        self._changed.set()
        await self._close_if_sold_out(mint)
        await self._finish_if_done()

    def selling(self, mint: str, position_id: str) -> bool:
        """Whether this exit sells ``mint``'s position ``position_id`` (queued, not over)."""
        queued = self.planner.exits.get(mint)
        return queued is not None and queued.position_id == position_id and self.summary is None

    async def on_closed(
        self, mint: str, position_id: str, reason: str, time: float | None = None
    ) -> None:
        """Trading closed ``mint``'s position ``position_id`` (``reason``) at ``time``:
        nothing of it is held any more, so no tranche more; once the tranche in flight is
        answered, its exit ends, reported closed by trading unless this exit sold it out.
        Closed before the exit began and nothing sold here, it leaves the exit instead."""
        if not self.selling(mint, position_id):
            return
        started = self.planner.started_at
        if time is not None and started is not None and time < started:
            self._withdrawing.add(position_id)
        queued, record = self.planner.close(mint, reason), self.records.get(mint)
        if record is not None:
            self._held_back(record, queued)
        self._changed.set()
        await self._close_if_sold_out(mint)
        await self._finish_if_done()

    async def on_late_outcome(self, outcome: OrderFilled | OrderRejected) -> None:
        """The outcome of a tranche the executor gave up (answered None) came: a fill
        counts, a refusal gives its tokens back to sell."""
        record = self.records.get(outcome.mint)
        if record is None or self.summary is not None:
            return
        asked = record.unconfirmed.pop(outcome.order_id, None)
        if asked is None:
            return
        filled = isinstance(outcome, OrderFilled)
        sold = outcome.token_amount if filled else None
        self.planner.record_late_outcome(outcome.mint, asked, sold)
        if filled:
            record.add_fill(outcome, self.clock.now())
        self._changed.set()
        await self._close_if_sold_out(outcome.mint)
        await self._finish_if_done()

    def calculate_optimal_exit_price(self, token_id: str) -> float | None:
        """Average price (before fees) the plan expects for what is left of ``token_id``."""
        return self.planner.expected_exit_price(token_id)

    def monitor_exit_progress(self) -> ExitProgress:
        now = self.clock.now()
        exits = self.planner.exits.values()
        started = self.planner.started_at
        return ExitProgress(
            started=started is not None,
            done=started is not None and self.planner.done,
            positions=len(self.planner.exits),
            sold_out=sum(1 for q in exits if q.done),
            in_flight=sum(1 for q in exits if q.in_flight),
            unconfirmed_tranches=sum(q.tranches_lost for q in exits),
            unconfirmed_tokens=sum(q.unconfirmed for q in exits),
            tranches=sum(q.tranches_filled for q in exits),
            tokens_at_start=sum(q.tokens_at_start for q in exits),
            tokens_left=sum(q.tokens_left for q in exits),
            sol_recovered=sum(r.sol_received for r in self.all_records()),
            elapsed_s=0.0 if started is None else now - started,
            deadline_margin_s=(self.planner.deadline or now) - now,
            pending_tokens=sum(q.reserved for q in exits if q.closed is None),
        )

    # ---------------------------------------------------------------- internals

    async def _execute(self, tranche: PlannedTranche) -> None:
        outcome = await self.trade_executor.execute_exit(tranche.order())
        if tranche.mint in self._handed:
            return
        now = self.clock.now()
        record = self.records[tranche.mint]
        if outcome is None:
            queued = self.planner.record_lost(tranche, now)
            record.unconfirmed[tranche.order_id] = tranche.token_amount
            log.warning("exit: no outcome of %s: its %.6g tokens unconfirmed, %.6g left to "
                        "offer", tranche.order_id, tranche.token_amount,
                        queued.free)  # fmt: skip
        elif isinstance(outcome, OrderFilled):
            self.planner.record_fill(tranche, outcome.token_amount, now)
            record.add_fill(outcome, now)
            if tranche.rule == DEADLINE:
                record.rule = DEADLINE
        else:
            self.planner.record_rejection(tranche, now)
        # whatever its answer: a position closed meanwhile ends with it
        await self._close_if_sold_out(tranche.mint)
        await self._finish_if_done()

    async def _close_if_sold_out(self, mint: str) -> None:
        """Report ``mint``'s exit once its position is sold out (once); one closed before
        the exit began with nothing sold here leaves it."""
        queued = self.planner.exits.get(mint)
        record = self.records.get(mint)
        if queued is None or not queued.done or record is None or record.finished_at is not None:
            return
        if record.position_id in self._withdrawing and not record.fills:
            self.planner.drop(mint)
            self.withdrawn.append(self.records.pop(mint))
            log.info("exit: %s was closed before the exit began: not the exit's",
                     record.position_id)  # fmt: skip
            if self.on_withdrawn is not None:
                await self.on_withdrawn(record)
            return
        self._end(record, self.clock.now())
        await self._publish(record.report())
        if self.on_exited is not None:
            await self.on_exited(record)

    @staticmethod
    def _held_back(record: ExitRecord, queued: QueuedExit) -> None:
        """``record`` counts the tokens rule sales hold back from ``queued`` now (none once
        trading closed the position: nothing of it is held)."""
        record.pending_tokens = queued.reserved if queued.closed is None else 0.0

    def _supersede(self, record: ExitRecord, time: float) -> None:
        """A later position on ``record``'s mint takes its place: its exit is over (as far
        as it got, if it was not reported yet)."""
        if record.finished_at is None:
            record.finish(time)
        self.earlier.append(record)

    def _end(self, record: ExitRecord, time: float) -> None:
        """``record``'s exit is over at ``time``: closed by trading if it was, and this
        exit did not sell it out."""
        queued = self.planner.exits.get(record.mint)
        if queued is not None and queued.closed is not None and not record.sold_out:
            record.closed = queued.closed
        record.finish(time)

    async def _finish_if_done(self) -> None:
        if self.planner.done and self.summary is None:
            await self._finish(force=False)

    async def _finish(self, *, force: bool) -> GracefulExitSummary:
        if self.summary is not None:
            return self.summary
        now = self.clock.now()
        for record in self.all_records():
            if record.finished_at is None and (force or record.completed):
                self._end(record, now)
        self.summary = GracefulExitSummary(
            reason=self.reason or "shutdown",
            started_at=self.planner.started_at if self.planner.started_at is not None else now,
            finished_at=now,
            deadline=self.planner.deadline if self.planner.deadline is not None else now,
            lines=tuple(r.line() for r in self.all_records()),
        )
        if self.publish_summary:
            await self._publish(self.summary.report())
        return self.summary

    async def _publish(self, payload: Payload) -> None:
        await self.event_bus.publish(make_event(payload, source=self.source, time=self.clock.now()))

    async def _wait_for_change(self, *waits: Awaitable[object]) -> None:
        """Wait for the first of ``waits``, or until a rule's sale settles."""
        self._changed.clear()
        await first_of(*waits, self._changed.wait())

    async def _wait_on_clock(self, when: float) -> None:
        reached = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not reached.done():
                reached.set_result(None)

        handle = self.clock.call_at(when, wake)
        try:
            await reached
        finally:
            handle.cancel()
