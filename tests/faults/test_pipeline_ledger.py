"""The pipeline's ledger with no fault: every frame sent is stored, carried and applied once."""

from __future__ import annotations

import pytest

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]


async def test_no_fault_every_event_sent_is_stored_carried_and_applied_once(pipeline_on_shared):
    pipeline = pipeline_on_shared
    await pipeline.start()
    await pipeline.until_recorded(1500)
    ledger = await pipeline.finish()
    print(ledger.report())
    assert ledger.problems() == [], ledger.report()
    assert ledger.lost == 0
    assert sum(ledger.sent.values()) >= 1500
    assert ledger.consumers["features"]["applied"] > 0
