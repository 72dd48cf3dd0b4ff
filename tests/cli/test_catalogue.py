"""The event catalogue in docs/ is the code's: regenerated here and compared."""

from __future__ import annotations

import json

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
from pumpflow.common.events import encode_event, make_event, registered
from pumpflow.common.runtime.topology import CONSUMER_GROUPS
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
    for operation in operations:
        received.setdefault(operation["x-pumpflow-group"], set()).add(
            operation["channel"]["$ref"].rsplit("/", 1)[-1]
        )
    for group, patterns in CONSUMER_GROUPS.items():
        bound = {f"{t}.v{v}" for t, v in registered() if any(topic_matches(p, t) for p in patterns)}
        assert received[group] == bound, group
    assert received["feed"] == {"feed.subscription.v1"}


def test_the_rendering_is_stable():
    assert rendered() == rendered()
