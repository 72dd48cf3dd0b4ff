"""The live executor: orders go to PumpPortal's trade API, fills come from the stream.

The service stores an order in the ledger (state ``sent``) before it hands it over
here, so a crash during the call leaves an order that is reconciled, never sent
again. :meth:`LiveExecutor.start_entry` and :meth:`LiveExecutor.start_exit` start
the call and return at once: the service
keeps consuming while the API answers. What the answer says is the service's to
store (:meth:`LiveExecutor.progress`): the signature, or ``unknown`` when no answer
came. Whether the order filled is what the token's stream shows
(:class:`~pumpflow.common.trading.LiveBook` has the rule), or, past the bounded
wait, an ``unconfirmed`` rejection.

The API key goes in the URL's ``api-key`` parameter, as PumpPortal asks; every text
that could carry it (an error, a URL) passes :func:`~pumpflow.common.pumpportal.redact`
before it is logged or stored.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from pumpflow.common.clock import Clock
from pumpflow.common.curve import CurveState
from pumpflow.common.events import ExitOrder, OrderRequested
from pumpflow.common.pumpportal import API_KEY_PARAM, redact
from pumpflow.common.trading import (
    VENUE_CURVE,
    Confirmation,
    EarlyTrade,
    LiveBook,
    LiveExecution,
    LiveOrder,
    UnbookedTrade,
)
from pumpflow.common.trading.orders import rejected
from pumpflow.common.trading.paper import Market, sell_order
from pumpflow.trading.executor import Outcome
from pumpflow.trading.ledger import FillRecord, OrderOutcome, OrderRecord

log = logging.getLogger("pumpflow.trading.live")

#: what PumpPortal's ``pool`` takes when the token's venue is not known
POOL_AUTO = "auto"
#: the API's (or a proxy's) rate limit: the call was turned away unprocessed
TOO_MANY_REQUESTS = 429
#: longest answer text kept in the ledger and the log
_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiAnswer:
    """What one call of the trade API came back with.

    ``signature``: a transaction exists (pending, whatever the status said);
    ``refused``: nothing was sent (no connection, a client error without a signature,
    a 429 whatever its body);
    ``unknown``: no answer (a timeout, a connection lost after the request left), a
    server error, a garbled answer or an acceptance without its signature.
    """

    kind: Literal["signature", "refused", "unknown"]
    detail: str
    signature: str | None = None
    #: the answer's HTTP status; None when no answer came
    status: int | None = None


class _MaskApiKey(logging.Filter):
    """httpx logs every request's URL, and the URL carries the key: mask it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def _mask_keys_in_httpx_logs() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _MaskApiKey) for f in logger.filters):
        logger.addFilter(_MaskApiKey())


class TradeApi:
    """PumpPortal's ``api/trade``: it signs with the key's wallet and sends."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float):
        self.url = url
        self._key = api_key
        self._timeout = timeout_s
        self._client: httpx.AsyncClient | None = None
        _mask_keys_in_httpx_logs()

    def __repr__(self) -> str:
        return f"TradeApi({redact(self.url, self._key)!r})"

    async def trade(self, body: dict[str, Any]) -> ApiAnswer:
        """Send one trade; never raises for what the network or the API does."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        try:
            # httpx bounds each read, not the answer: a body trickling in would hold the
            # order without an outcome past its confirmation wait
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(
                    self.url, params={API_KEY_PARAM: self._key}, json=body
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # no connection, so no request: nothing was sent
            return ApiAnswer(kind="refused", detail=self._clean(f"trade API unreachable: {exc}"))
        except (httpx.TimeoutException, TimeoutError):
            return ApiAnswer(
                kind="unknown", detail=f"no answer from the trade API within {self._timeout:g} s"
            )
        except httpx.HTTPError as exc:
            return ApiAnswer(kind="unknown", detail=self._clean(f"trade API call lost: {exc!r}"))
        return self._read(response)

    def _read(self, response: httpx.Response) -> ApiAnswer:
        try:
            answer = response.json()
        except ValueError:
            answer = None
        signature = answer.get("signature") if isinstance(answer, dict) else None
        errors = answer.get("errors") if isinstance(answer, dict) else None
        detail = f"HTTP {response.status_code}"
        if errors:
            detail += f": {errors}"
        elif not isinstance(answer, dict):
            detail += f": {response.text}"
        detail = self._clean(detail)
        if isinstance(signature, str) and signature:
            return ApiAnswer(
                kind="signature", detail=detail, signature=signature, status=response.status_code
            )
        if response.status_code == TOO_MANY_REQUESTS:
            # throttled before anything was signed, whatever body a proxy put on it
            return ApiAnswer(kind="refused", detail=detail, status=response.status_code)
        if (
            response.status_code >= 500
            or not isinstance(answer, dict)
            or (response.is_success and not errors)
        ):
            # a server error, a garbled answer or an acceptance without its signature may
            # come after the transaction left
            return ApiAnswer(kind="unknown", detail=detail, status=response.status_code)
        return ApiAnswer(kind="refused", detail=detail, status=response.status_code)

    def _clean(self, text: str) -> str:
        return redact(text, self._key)[:_DETAIL_CHARS]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class LiveExecutor:
    """Live execution through the trade API; outcomes from the token's stream."""

    name = "live"

    def __init__(
        self,
        execution: LiveExecution,
        api: TradeApi,
        *,
        clock: Clock,
        slippage_pct: float,
    ):
        self.execution = execution
        self.api = api
        self.clock = clock
        self.slippage_pct = slippage_pct
        self.book = LiveBook(execution)
        #: calls in flight, by order id
        self.calls: dict[str, asyncio.Task[None]] = {}
        self._progress: list[OrderOutcome] = []
        self._outcomes: list[Outcome] = []

    def expected(self, mint: str) -> tuple[str, CurveState | None]:
        market = self.book.market(mint)
        if market is None:
            return VENUE_CURVE, None
        return market.venue, market.state

    async def start_entry(self, order: OrderRequested, *, time: float) -> Outcome | None:
        """Start the buy's call (the ledger holds the order already)."""
        return self._send(order, time)

    async def start_exit(self, order: ExitOrder, *, time: float) -> Outcome | None:
        """Start the sale's call (the ledger holds the order already)."""
        return self._send(sell_order(order), time)

    def _send(self, order: OrderRequested, time: float) -> Outcome | None:
        """Start the call; never sent twice from here."""
        amount = order.sol_amount if order.side == "buy" else order.token_amount
        market = self.book.market(order.mint)
        if amount is None or amount <= 0:
            return rejected(order, f"no amount to {order.side}")
        if order.side == "buy" and market is not None and market.venue != VENUE_CURVE:
            return rejected(order, "the token has left its bonding curve")
        if order.order_id in self.calls or order.order_id in self.book.pending:
            return None
        body = {
            "action": order.side,
            "mint": order.mint,
            "amount": float(amount),
            "denominatedInSol": "true" if order.side == "buy" else "false",
            "slippage": order.slippage_pct,
            "priorityFee": self.execution.priority_fee_sol,
            "pool": market.venue if market is not None else POOL_AUTO,
        }
        self.book.add(
            LiveOrder(
                order_id=order.order_id,
                mint=order.mint,
                side=order.side,
                # from the send: a store retried while Postgres was away sends it late
                deadline=self.clock.now() + self.execution.confirm_s,
                sent_at=time,
                position_id=order.position_id,
                amount=float(amount),
                slippage_pct=order.slippage_pct,
                expected=market.state if market is not None else None,
                venue=market.venue if market is not None else VENUE_CURVE,
                awaiting=True,
            )
        )
        task = asyncio.get_running_loop().create_task(self._call(order.order_id, body))
        self.calls[order.order_id] = task
        task.add_done_callback(lambda _: self.calls.pop(order.order_id, None))
        return None

    async def _call(self, order_id: str, body: dict[str, Any]) -> None:
        answer = await self.api.trade(body)
        if answer.kind == "signature":
            assert answer.signature is not None
            if self.book.answered(order_id, answer.signature):
                log.info(
                    "trading: order %s sent, signature %s (%s)",
                    order_id, answer.signature, answer.detail,
                )  # fmt: skip
                self._progress.append(
                    OrderOutcome(
                        order_id=order_id,
                        state="sent",
                        outcome=f"awaiting its trade ({answer.detail})",
                        signature=answer.signature,
                    )
                )
        elif answer.kind == "refused":
            rejected = self.book.refused(
                order_id,
                f"trade API refused: {answer.detail}",
                answered=answer.status is not None,
            )
            if rejected is not None:
                self._outcomes.append(rejected)
        else:
            self._unknown(order_id, answer.detail)

    def _unknown(self, order_id: str, why: str) -> None:
        """Tell the order's outcome unknown (no answer said it, ``why``): the wallet's
        trades on the token settle it, it is never sent again."""
        log.warning(
            "trading: order %s: %s; its outcome is unknown: the wallet's trades on the "
            "token settle it, it is never sent again", order_id, why,
        )  # fmt: skip
        self.book.unanswered(order_id)
        if order_id in self.book.pending:
            self._progress.append(OrderOutcome(order_id=order_id, state="unknown", outcome=why))

    def progress(self) -> list[OrderOutcome]:
        """What the API's answers said of orders still pending, to store (then forgotten)."""
        found, self._progress = self._progress, []
        return found

    def unbooked(self) -> list[UnbookedTrade]:
        return self.book.unbooked()

    def early(self) -> list[EarlyTrade]:
        return self.book.early()

    def observe(self, payload: object, *, time: float) -> list[Outcome]:
        return self._fills(self.book.observe(payload, time=time))

    def restore_early(self, trades: list[EarlyTrade]) -> list[Outcome]:
        return self._fills(self.book.restore_early(trades))

    def _fills(self, confirmations: list[Confirmation]) -> list[Outcome]:
        for confirmation in confirmations:
            if confirmation.late:
                log.error(
                    "trading: order %s given up unconfirmed traded after all (signature "
                    "%s): booked late", confirmation.fill.order_id, confirmation.fill.signature,
                )  # fmt: skip
        return [confirmation.fill for confirmation in confirmations]

    def due(self, now: float) -> list[Outcome]:
        outcomes, self._outcomes = self._outcomes, []
        # trades of the wallet that showed before the answers naming them
        outcomes += [confirmation.fill for confirmation in self.book.settled()]
        for given_up in self.book.due(now):
            log.warning("trading: order %s %s", given_up.order_id, given_up.reason)
            outcomes.append(given_up)
        return outcomes

    def next_due(self) -> float | None:
        return self.book.next_due()

    def reconcile(self, order: OrderRecord) -> Outcome | None:
        """Wait again for the order's trade, from now (what the stream showed while no
        replica traded is not seen again); never send it again."""
        self.book.add(self._live_order(order, deadline=self.clock.now() + self.execution.confirm_s))
        return None

    def restore_unbooked(self, trades: list[UnbookedTrade]) -> None:
        self.book.recent_unbooked.extend(trades)

    def given_up(self, order: OrderRecord) -> None:
        """Book the order's trade should its signature show late after all."""
        if order.executor != self.name or order.signature is None:
            return
        self.book.given_up(self._live_order(order, deadline=order.requested_at))

    def booked(self, fill: FillRecord) -> None:
        if fill.signature is not None:
            self.book.booked(fill.signature)

    def _live_order(self, order: OrderRecord, *, deadline: float) -> LiveOrder:
        """The live book's order of a ledger's record."""
        amount = order.sol_amount if order.side == "buy" else order.token_amount
        return LiveOrder(
            order_id=order.order_id,
            mint=order.mint,
            side=order.side,
            deadline=deadline,
            sent_at=order.requested_at,
            position_id=order.position_id,
            signature=order.signature,
            amount=float(amount or 0.0),
            slippage_pct=order.slippage_pct,
        )

    def restore_market(self, mint: str, market: Market) -> None:
        self.book.markets[mint] = Market(venue=market.venue, state=market.state)

    def forget(self, mint: str) -> None:
        self.book.forget(mint)

    async def close(self) -> None:
        """Stop the calls in flight (their orders stay in the ledger to reconcile, told
        unknown by :meth:`progress`: the API may have sent them); no answer comes for
        them, so a trade of the wallet that showed meanwhile is settled (:meth:`due`
        gives its fill)."""
        calls = dict(self.calls)
        for call in calls.values():
            call.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
        for order_id in calls:
            order = self.book.pending.get(order_id)
            if order is None or not order.awaiting:
                continue  # answered before the cancel took
            self._unknown(order_id, "the service stopped before the trade API answered")
        await self.api.close()
