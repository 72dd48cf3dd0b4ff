"""Many short-lived tokens: what the feed, features and activity hold per mint levels off.

Runs ``benchmarks/token_churn.py`` small: a token every 4 simulated seconds, trading
for a minute and then quiet, for about 100 simulated minutes. Bounded means each count
of per-mint entries stops growing once the first tokens have retired, however many
more launch; the benchmark prints the same counts with the process's memory for
longer runs (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pumpflow.feed.manager import FeedManagerConfig

pytestmark = pytest.mark.slow

WINDOW_S = 600.0
EVERY_S = 4.0


def _churn_module():
    path = Path(__file__).parents[1] / "benchmarks" / "token_churn.py"
    spec = importlib.util.spec_from_file_location("token_churn", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_per_mint_entries_level_off_as_short_lived_tokens_come_and_go():
    churn = _churn_module().churn
    feed = FeedManagerConfig(source="feed/churn", seq_restore_window_s=WINDOW_S)
    samples = [s async for s in churn(1500, every_s=EVERY_S, trades=3, sample_every=250, feed=feed)]
    assert samples[-1].tokens == 1500
    # the feed numbers only the mints of its window
    assert all(s.sequencer <= WINDOW_S / EVERY_S + 1 for s in samples)
    # from some point on every count stands still while tokens keep launching
    fields = ("sequencer", "features_keys", "activity_keys", "store_keys", "index_entries")
    for field in fields:
        counts = [getattr(s, field) for s in samples]
        assert counts[-1] == counts[-2] == counts[-3], (field, counts)
    # in memory, a small share of the tokens (the store keeps retired records for a TTL)
    last = samples[-1]
    assert max(last.sequencer, last.features_keys, last.activity_keys) < 1500 / 5
    assert last.index_entries <= last.features_keys + last.activity_keys
