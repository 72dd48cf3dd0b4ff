"""The model service as processes (``pumpflow serve model``) over RabbitMQ and Redis.

Two replicas share the partitions; vectors go in over the broker, predictions come
out; an arm change made through one replica's API is followed by the other.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from model_helpers import DEFAULT_CARD

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.model.arms import Arm, ArmTable
from pumpflow.common.testing import (
    FeatureUpdates,
    eventually,
    free_port,
    http_get,
    http_json,
)
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

START = 1_700_000_000.0
TOKEN = "sesame"
PARTITIONS = 4


def put_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def test_replicas_score_over_rabbitmq_and_follow_an_arm_change(
    process_stack, namespace, amqp_url
):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    vectors = FeatureUpdates().of(
        market_events(Market(MarketConfig(seed=9)), 240.0, start_epoch=START, source="feed/sim")
    )
    ports = {"m1": free_port(), "m2": free_port()}
    for name, port in ports.items():
        process_stack.serve(
            "model", name=name, replica=name, http_port=port, api_token=TOKEN, partitions=PARTITIONS
        )
    bus = RabbitMQBus(
        url=amqp_url,
        namespace=namespace,
        partitions=PARTITIONS,
        prefetch=256,
        source="features/test",
    )
    await bus.start()
    predictions = []

    async def collect(event) -> None:
        predictions.append(event)

    try:
        await bus.subscribe(
            Subscription(service="collector", patterns=("model.prediction",), handler=collect)
        )

        def ready() -> bool:
            return all(http_get(f"http://127.0.0.1:{p}/readyz")[0] == 200 for p in ports.values())

        await eventually(
            lambda: asyncio.to_thread(ready),
            60,
            what="both replicas ready",
            details=process_stack.logs,
            interval=0.25,
        )
        half = len(vectors) // 2
        await bus.publish_many(vectors[:half])
        first_mints = {v.key for v in vectors[:half]}
        await eventually(
            lambda: first_mints <= {p.key for p in predictions},
            60,
            what="a prediction of every token of the first half",
            details=process_stack.logs,
        )

        arms = [
            {"name": "control", "model_id": "entry", "weight": 0.5},
            {"name": "treatment", "model_id": "entry", "weight": 0.5},
        ]
        status, answer = put_json(f"http://127.0.0.1:{ports['m1']}/arms", {"arms": arms})
        assert status == 200, answer
        revision = answer["revision"]

        def followed() -> bool:
            found = http_json(f"http://127.0.0.1:{ports['m2']}/arms") or {}
            return found.get("revision") == revision

        await eventually(
            lambda: asyncio.to_thread(followed),
            30,
            what="m2 follows the change",
            details=process_stack.logs,
        )
        mark = len(predictions)
        await bus.publish_many(vectors[half:])
        second = {v.id for v in vectors[half:]}
        second_mints = {v.key for v in vectors[half:]} - first_mints
        await eventually(
            lambda: second_mints <= {p.key for p in predictions[mark:]},
            60,
            what="a prediction of every new token of the second half",
            details=process_stack.logs,
        )
        table = ArmTable([Arm(**a) for a in arms])
        late = [p for p in predictions if p.causation_id in second]
        assert late and {p.data.arm for p in late} == {"control", "treatment"}
        for p in late:
            # a token scored before the change stays with the arm that scored it
            placed = "control" if p.key in first_mints else table.live_arm(p.key).name
            assert p.data.arm == placed
            assert p.data.model_version == DEFAULT_CARD.version
        assert any(table.live_arm(p.key).name == "treatment" for p in late if p.key in first_mints)
        # per mint, one sequence across both replicas: nothing lost, nothing doubled
        await bus.drain(10.0)
        by_mint: dict[str, list[int]] = {}
        for p in predictions:
            by_mint.setdefault(p.key, []).append(p.seq)
        for mint, seqs in by_mint.items():
            assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), mint
        codes = await process_stack.stop_all(list(ports))
        assert codes == {"m1": 0, "m2": 0}, process_stack.logs()
    finally:
        await bus.delete_topology()
        await bus.close()
