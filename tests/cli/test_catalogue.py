"""The event catalogue in docs/ is the code's: regenerated here and compared."""

from __future__ import annotations

import json

from pumpflow.cli.backtest import RUN_CONFIG, run_backtest, simulated_frames
from pumpflow.cli.catalogue import (
    ASYNCAPI_FILE,
    DOCS,
    MARKDOWN_FILE,
    REFRESH,
    asyncapi_document,
    rendered,
    stale,
)
from pumpflow.cli.main import main
from pumpflow.common.bus.routing import DEFAULT_PARTITIONS, routing_key_for, topic_matches
from pumpflow.common.events import encode_event, make_event, registered, source_service
from pumpflow.common.runtime.topology import CONSUMER_GROUPS, PUBLISHERS
from pumpflow.common.testing.factories import sample_payload


def test_the_committed_catalogue_is_the_code_s():
    outdated = stale(DOCS)
    assert not outdated, (
        f"docs/{', docs/'.join(outdated)} differ from the event schemas or routing in the "
        f"code: run `{REFRESH}` and commit the result"
    )


def test_the_check_fails_on_a_stale_file_and_says_how_to_refresh(tmp_path, capsys):
    assert main(["catalogue", "--out", str(tmp_path)]) == 0
    assert main(["catalogue", "--out", str(tmp_path), "--check"]) == 0
    asyncapi = tmp_path / ASYNCAPI_FILE
    asyncapi.write_text(asyncapi.read_text().replace('"token.trade"', '"token.trades"'))
    capsys.readouterr()
    assert main(["catalogue", "--out", str(tmp_path), "--check"]) == 1
    assert f"run `{REFRESH}` to refresh" in capsys.readouterr().err
    (tmp_path / MARKDOWN_FILE).unlink()
    assert stale(tmp_path) == [ASYNCAPI_FILE, MARKDOWN_FILE]


def test_an_out_that_is_no_folder_is_refused_as_the_flags_error(tmp_path, capsys):
    """Not "File exists" for a file, nor "differ from the code" for a folder not there."""
    file = tmp_path / "events.md"
    file.write_text("mine")
    assert main(["catalogue", "--out", str(file)]) == 2
    assert capsys.readouterr().err == f"pumpflow catalogue: --out {file}: not a directory\n"
    assert file.read_text() == "mine"
    missing = tmp_path / "docs"
    assert main(["catalogue", "--out", str(missing), "--check"]) == 2
    assert capsys.readouterr().err == f"pumpflow catalogue: --out {missing}: no such directory\n"
    assert not missing.exists()


def test_every_registered_type_has_a_channel_its_events_route_to():
    document = asyncapi_document()
    channels, components = document["channels"], document["components"]
    assert set(channels) == {f"{t}.v{v}" for t, v in registered()}
    for (event_type, version), schema in registered().items():
        event = make_event(sample_payload(schema, key="Mint111"), source="test", time=1.0)
        channel = channels[f"{event_type}.v{version}"]
        address = channel["address"].replace("{partition}", "*")
        assert topic_matches(address, routing_key_for(event, DEFAULT_PARTITIONS)), event_type
        # the message's schema is the envelope the bus carries, with this payload in data
        (message_ref,) = channel["messages"].values()
        message = components["messages"][message_ref["$ref"].rsplit("/", 1)[-1]]
        data = message["payload"]["allOf"][1]["properties"]["data"]
        payload = components["schemas"][data["$ref"].rsplit("/", 1)[-1]]
        wire = json.loads(encode_event(event))
        assert set(payload["required"]) <= set(wire["data"]) <= set(payload["properties"])


def test_every_consumer_group_receives_what_it_binds():
    operations = asyncapi_document()["operations"].values()
    received: dict[str, set[str]] = {}
    for operation in (op for op in operations if op["action"] == "receive"):
        received.setdefault(operation["x-pumpflow-group"], set()).add(
            operation["channel"]["$ref"].rsplit("/", 1)[-1]
        )
    for group, patterns in CONSUMER_GROUPS.items():
        bound = {f"{t}.v{v}" for t, v in registered() if any(topic_matches(p, t) for p in patterns)}
        assert received[group] == bound, group
    assert received["feed"] == {"feed.subscription.v1"}


async def test_the_publishers_are_who_publishes_in_a_whole_run():
    published: set[tuple[str, str]] = set()

    async def observe(event) -> None:
        published.add((source_service(event.source), event.type))

    # five market minutes: entries, exits, drift; 15 of the 19 types
    frames = simulated_frames(6, 5.0, start=1_700_000_000.0)
    await run_backtest(frames, RUN_CONFIG, observe=observe)
    declared = {(service, t) for service, types in PUBLISHERS.items() for t in types}
    assert published <= declared, sorted(published - declared)
    assert {event_type for _, event_type in published} >= {
        "token.created", "token.trade", "features.updated", "token.lifecycle",
        "feed.subscription", "model.prediction", "order.requested", "order.filled",
        "position.opened", "position.closed", "exit.order", "exit.report",
    }  # fmt: skip
    sends = {
        (op["x-pumpflow-service"], op["channel"]["$ref"].rsplit("/", 1)[-1])
        for op in asyncapi_document()["operations"].values()
        if op["action"] == "send"
    }
    assert sends == {(service, f"{t}.v1") for service, t in declared}


def test_the_rendering_is_stable():
    assert rendered() == rendered()


def test_the_markdown_says_what_a_routing_keys_partition_is():
    """Its table gives keyed routing keys as ``<type>.v<major>.{partition}``: the key a
    queue binds needs what ``{partition}`` stands for."""
    event = make_event(sample_payload(registered()[("token.trade", 1)], key="Mint111"),
                       source="test", time=1.0)  # fmt: skip
    partition = routing_key_for(event, DEFAULT_PARTITIONS).rsplit(".", 1)[1]
    page = " ".join(rendered()[MARKDOWN_FILE].split())
    assert f"`{{partition}}` is the key's partition, `p00` to `p{DEFAULT_PARTITIONS - 1}`" in page
    assert partition.startswith("p") and len(partition) == 3
