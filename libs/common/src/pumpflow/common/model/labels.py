"""Labels: what happened to a token's price after each scored trade.

One definition (:class:`~pumpflow.common.model.card.LabelDefinition`) serves training
(over a whole history) and live performance (resolved once the horizon has passed):
buying at the price a trade left, paying the curve fee, and selling later at a trade's
price, paying the fee again. Price impact of the position itself is not modelled: the
positions sized by the risk limits are small against the curve's reserves.

Defaults: :mod:`pumpflow.common.model.settings`.
"""

from __future__ import annotations

import numpy as np

from pumpflow.common.model.card import LabelDefinition
from pumpflow.common.model.settings import (
    DEFAULT_FEE_RATE,
    DEFAULT_HORIZON_S,
    DEFAULT_STOP_LOSS,
    DEFAULT_TAKE_PROFIT,
)

DEFAULT_CLASSIFICATION = LabelDefinition(
    kind="take_profit_first",
    horizon_s=DEFAULT_HORIZON_S,
    take_profit=DEFAULT_TAKE_PROFIT,
    stop_loss=DEFAULT_STOP_LOSS,
    fee_rate=DEFAULT_FEE_RATE,
)
DEFAULT_REGRESSION = LabelDefinition(
    kind="net_return", horizon_s=DEFAULT_HORIZON_S, fee_rate=DEFAULT_FEE_RATE
)


def net_multiplier(fee_rate: float) -> float:
    """Sale proceeds per unit of price paid, fee both ways: (1 - f) / (1 + f)."""
    return (1.0 - fee_rate) / (1.0 + fee_rate)


def barriers(entry_price, definition: LabelDefinition):
    """Prices at which a position bought at ``entry_price`` takes profit, and stops.

    Net of the fee both ways: selling at ``up`` returns ``+take_profit``, at ``down``
    ``-stop_loss``. Works on floats and arrays alike.
    """
    keep = net_multiplier(definition.fee_rate)
    up = entry_price * ((1.0 + definition.take_profit) / keep)
    down = entry_price * ((1.0 - definition.stop_loss) / keep)
    return up, down


def net_return(entry_price, exit_price, fee_rate: float):
    """Return of buying at ``entry_price`` and selling at ``exit_price``, fee both ways."""
    return exit_price * net_multiplier(fee_rate) / entry_price - 1.0


def label_history(
    time: np.ndarray, price: np.ndarray, definition: LabelDefinition, *, data_end: float
) -> np.ndarray:
    """The label after each trade of one token (oldest first); NaN where unresolved.

    ``data_end`` is the end of what is known of the token: a row whose horizon runs past
    it is resolved only if the take-profit or stop was already hit (classification).
    """
    n = len(time)
    horizon_end = time + definition.horizon_s
    # trades j > i with time[j] <= time[i] + horizon
    stop = np.searchsorted(time, horizon_end, side="right")
    known = horizon_end <= data_end
    if definition.kind == "net_return":
        exit_price = np.where(stop > np.arange(n) + 1, price[np.maximum(stop - 1, 0)], price)
        labels = net_return(price, exit_price, definition.fee_rate)
        labels[~known] = np.nan
        return labels
    if definition.kind != "take_profit_first":
        raise ValueError(f"unknown label kind {definition.kind!r}")
    up, down = barriers(price, definition)
    labels = np.where(known, 0.0, np.nan)
    # walk forward one trade at a time over the rows still open (vectorised across rows)
    rows = np.arange(n)
    offset = 1
    while len(rows):
        j = rows + offset
        inside = j < stop[rows]
        rows, j = rows[inside], j[inside]
        hit_up = price[j] >= up[rows]
        hit_down = price[j] <= down[rows]
        labels[rows[hit_up & ~hit_down]] = 1.0
        labels[rows[hit_down]] = 0.0
        rows = rows[~(hit_up | hit_down)]
        offset += 1
    return labels
