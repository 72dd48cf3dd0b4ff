"""Exit reports: what each exit realised against the mark when it began, and a summary.

Slippage is ``1 - average fill price / mark price``, both before fees: what the sale's
own impact and the market's move while it ran cost. ``sol_recovered`` is what the
fills paid after every fee; ``mark_value_sol`` values the same tokens at the mark, so
their difference is everything the exit cost, fees included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pumpflow.common.events import ExitLine, ExitReport, OrderFilled
from pumpflow.common.text import counted


@dataclass(frozen=True, slots=True, kw_only=True)
class TrancheFill:
    order_id: str
    tokens: float
    sol: float
    price: float
    fee_sol: float
    time: float


@dataclass(slots=True, kw_only=True)
class ExitRecord:
    """One position's exit as it happens: its fills against its starting mark."""

    mint: str
    position_id: str
    rule: str
    tokens_at_start: float
    mark_price: float | None
    started_at: float
    fills: list[TrancheFill] = field(default_factory=list)
    finished_at: float | None = None
    #: tranches sent whose outcome never came (order id -> tokens asked): they may
    #: have sold
    unconfirmed: dict[str, float] = field(default_factory=dict)
    #: the reason trading closed the position before this exit sold it out
    closed: str | None = None
    #: tokens a rule's sale ordered before the exit began holds back, awaiting its
    #: outcome: not this exit's to sell, yet the position is not sold out while they wait
    pending_tokens: float = 0.0
    #: the rule whose sale, ordered before the exit began, sold tokens of the position
    sold_by_rule: str | None = None

    def add_fill(self, fill: OrderFilled, time: float) -> TrancheFill:
        tranche = TrancheFill(
            order_id=fill.order_id,
            tokens=fill.token_amount,
            sol=fill.sol_amount,
            price=fill.price,
            fee_sol=fill.fee_sol,
            time=time,
        )
        if all(f.order_id != fill.order_id for f in self.fills):
            self.fills.append(tranche)
        return tranche

    def finish(self, time: float, *, rule: str | None = None) -> None:
        self.finished_at = time
        if rule is not None:
            self.rule = rule

    @property
    def tokens_sold(self) -> float:
        return sum(f.tokens for f in self.fills)

    @property
    def sol_received(self) -> float:
        return sum(f.sol for f in self.fills)

    @property
    def fee_sol(self) -> float:
        return sum(f.fee_sol for f in self.fills)

    @property
    def sold_out(self) -> bool:
        return self.pending_tokens <= 0 and self.tokens_sold >= self.tokens_at_start * (1 - 1e-9)

    @property
    def completed(self) -> bool:
        """Nothing of the position is left: sold out, or closed by trading."""
        return self.sold_out or self.closed is not None

    @property
    def average_price(self) -> float | None:
        sold = self.tokens_sold
        return sum(f.price * f.tokens for f in self.fills) / sold if sold else None

    @property
    def slippage(self) -> float | None:
        average = self.average_price
        if average is None or not self.mark_price:
            return None
        return 1.0 - average / self.mark_price

    @property
    def mark_value_sol(self) -> float | None:
        return self.tokens_sold * self.mark_price if self.mark_price else None

    @property
    def duration_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def line(self) -> ExitLine:
        return ExitLine(
            position_id=self.position_id,
            mint=self.mint,
            tokens_sold=self.tokens_sold,
            sol_received=self.sol_received,
            tranches=len(self.fills),
            completed=self.completed,
            # sold out by a rule's sale alone: that rule's, the exit sold nothing
            reason=self.sold_by_rule if self.sold_by_rule and not self.fills else self.rule,
            mark_price=self.mark_price,
            average_price=self.average_price,
            slippage=self.slippage,
            mark_value_sol=self.mark_value_sol,
            fee_sol=self.fee_sol,
            started_at=self.started_at,
            finished_at=self.finished_at,
            unconfirmed_tranches=len(self.unconfirmed),
            unconfirmed_tokens=sum(self.unconfirmed.values()),
            # trading closed it: nothing of it is held back any more
            pending_tokens=0.0 if self.closed else self.pending_tokens,
            closed=self.closed or "",
        )

    def report(self) -> ExitReport:
        """This exit alone, as an ``exit.report``."""
        return ExitReport(
            reason=self.rule,
            started_at=self.started_at,
            finished_at=self.finished_at if self.finished_at is not None else self.started_at,
            positions=(self.line(),),
            sol_recovered=self.sol_received,
            mark_value_sol=self.mark_value_sol,
            worst_slippage=self.slippage,
            positions_left=0 if self.completed else 1,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GracefulExitSummary:
    """A graceful exit of every position, at its end (or as far as it got)."""

    reason: str
    started_at: float
    finished_at: float
    deadline: float
    lines: tuple[ExitLine, ...]

    @property
    def positions(self) -> int:
        return len(self.lines)

    @property
    def positions_left(self) -> int:
        return sum(1 for line in self.lines if not line.completed)

    @property
    def closed(self) -> int:
        """Positions trading closed before the exit sold them out."""
        return sum(1 for line in self.lines if line.closed)

    @property
    def tranches(self) -> int:
        return sum(line.tranches for line in self.lines)

    @property
    def unconfirmed(self) -> tuple[ExitLine, ...]:
        """Positions with tranches whose outcome never came (their tokens may have sold)."""
        return tuple(line for line in self.lines if line.unconfirmed_tranches)

    @property
    def awaiting(self) -> tuple[ExitLine, ...]:
        """Positions whose tokens a rule's sale held back with no outcome by the end
        (still held, or sold by it)."""
        return tuple(line for line in self.lines if line.pending_tokens)

    @property
    def without_outcome(self) -> tuple[ExitLine, ...]:
        """Positions with tokens in a sale, a tranche's or a rule's, whose outcome never
        came."""
        return tuple(
            line for line in self.lines if line.unconfirmed_tranches or line.pending_tokens
        )

    @property
    def sol_recovered(self) -> float:
        return sum(line.sol_received for line in self.lines)

    @property
    def mark_value_sol(self) -> float:
        return sum(line.mark_value_sol or 0.0 for line in self.lines)

    @property
    def worst_slippage(self) -> float | None:
        slippages = [line.slippage for line in self.lines if line.slippage is not None]
        return max(slippages) if slippages else None

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at

    @property
    def deadline_margin_s(self) -> float:
        return self.deadline - self.finished_at

    def report(self) -> ExitReport:
        return ExitReport(
            reason=self.reason,
            started_at=self.started_at,
            finished_at=self.finished_at,
            positions=self.lines,
            graceful=True,
            deadline=self.deadline,
            sol_recovered=self.sol_recovered,
            mark_value_sol=self.mark_value_sol,
            worst_slippage=self.worst_slippage,
            positions_left=self.positions_left,
        )

    @classmethod
    def from_report(cls, report: ExitReport) -> GracefulExitSummary:
        return cls(
            reason=report.reason,
            started_at=report.started_at,
            finished_at=report.finished_at,
            deadline=report.deadline if report.deadline is not None else report.finished_at,
            lines=report.positions,
        )

    def text(self, names: Mapping[str, str] | None = None) -> str:
        """The summary as the CLI prints it, each position by its token's name in
        ``names`` (by mint) where it has one."""
        worst = self.worst_slippage
        lines = [
            f"graceful exit ({self.reason}): {counted(self.positions, 'position')}, "
            f"{self.positions - self.positions_left - self.closed:,} sold out, "
            + (f"{self.closed:,} closed by trading, " if self.closed else "")
            + f"{counted(self.tranches, 'tranche')} "
            f"in {self.duration_s:.1f}s ({self.deadline_margin_s:+.1f}s to the deadline)",
            f"SOL recovered {self.sol_recovered:.4f} against {self.mark_value_sol:.4f} at the "
            f"marks; worst slippage {'-' if worst is None else f'{worst:.2%}'}",
        ]
        unconfirmed = self.unconfirmed
        if unconfirmed:
            lines.append(
                "UNCONFIRMED: "
                f"{counted(sum(line.unconfirmed_tranches for line in unconfirmed), 'tranche')} "
                f"of {counted(len(unconfirmed), 'position')} got no outcome; their "
                f"{sum(line.unconfirmed_tokens for line in unconfirmed):.6g} tokens may "
                "have sold (trading's ledger knows)"
            )
        awaiting = self.awaiting
        if awaiting:
            lines.append(
                f"AWAITING: rule sales of {counted(len(awaiting), 'position')} got no outcome; "
                f"their {sum(line.pending_tokens for line in awaiting):.6g} tokens are still "
                "held or sold by them (trading's ledger knows)"
            )
        for line in self.lines:
            slip = "-" if line.slippage is None else f"{line.slippage:.2%}"
            left = "" if line.completed else "  NOT SOLD OUT"
            if line.closed:
                left += f"  closed by trading ({line.closed})"
            if line.unconfirmed_tranches:
                left += f"  {line.unconfirmed_tokens:.6g} tokens UNCONFIRMED"
            if line.pending_tokens:
                left += f"  {line.pending_tokens:.6g} tokens in a rule's sale AWAITING its outcome"
            elif line.completed and not line.tranches and not line.closed:
                left += f"  sold by its {line.reason} sale, ordered before the exit"
            label = (names or {}).get(line.mint) or line.mint[:12]
            lines.append(
                f"  {label:<12} {line.reason:<9} {counted(line.tranches, 'tranche'):>12} "
                f"{line.sol_received:>10.4f} SOL  slippage {slip}" + left
            )
        return "\n".join(lines)
