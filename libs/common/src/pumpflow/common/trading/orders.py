"""What every order shares, whatever holds it: a request, a ledger record, a paper or a
live order."""

from __future__ import annotations

from typing import Protocol

from pumpflow.common.events import OrderRejected, RejectionCause


class AnOrder(Protocol):
    @property
    def order_id(self) -> str: ...

    @property
    def mint(self) -> str: ...

    @property
    def side(self) -> str: ...

    @property
    def position_id(self) -> str | None: ...


def rejected(order: AnOrder, reason: str, *, cause: RejectionCause | None = None) -> OrderRejected:
    """The refusal of ``order``, for ``reason``."""
    return OrderRejected(
        order_id=order.order_id,
        mint=order.mint,
        reason=reason,
        side=order.side,
        position_id=order.position_id,
        cause=cause,
    )
