"""``pumpflow catalogue``: the event catalogue, generated from the code.

Writes ``docs/events.asyncapi.json`` (AsyncAPI 3.0) and ``docs/events.md`` (the same,
for reading) from what the code declares: every registered payload schema
(:func:`pumpflow.common.events.registered`, as JSON Schema by msgspec), its routing
key and lane on the RabbitMQ topic exchange (:mod:`pumpflow.common.bus.routing`,
:func:`~pumpflow.common.bus.dispatch.publish_lane`) and the consumer groups that bind
it (:data:`pumpflow.common.runtime.topology.CONSUMER_GROUPS`, and the feed's commands)
and the services that publish it (:data:`~pumpflow.common.runtime.topology.PUBLISHERS`).
``--check`` writes nothing and fails when the committed files differ from the code's;
the test suite runs the same check.

Channels are event types at a major version (``token.trade.v1``), addressed by the
routing key ``<type>.v<major>.p<NN>`` (keyed events, ``NN`` the key's partition) or
``<type>.v<major>.bcast`` (keyless events); messages are the envelope with the type's
payload in ``data``; operations are the services' publications and the consumer
groups' receptions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from pumpflow.common.events import Event, registered
from pumpflow.common.runtime.arguments import UsageError, help_text

# the bus and the topology (which names every service's domain) are imported where the
# document is made: every pumpflow command registers this one
if TYPE_CHECKING:
    from pumpflow.common.events import Payload

ASYNCAPI_FILE = "events.asyncapi.json"
MARKDOWN_FILE = "events.md"
#: where the files live, from the repository's root
DOCS = Path(__file__).resolve().parents[3] / "docs"
SCHEMA_REF = "#/components/schemas/{name}"
ENVELOPE = "Envelope"
#: AMQP channel binding version of the AsyncAPI bindings
AMQP_BINDING = "0.3.0"
REFRESH = "pumpflow catalogue"


def consumer_groups() -> dict[str, tuple[str, ...]]:
    """Consumer group -> the event-type patterns it binds, as deployed."""
    from pumpflow.common.runtime.topology import CONSUMER_GROUPS
    from pumpflow.feed.service import CONSUMES as FEED_CONSUMES

    # the feed's commands are keyless, on per-replica queues declared by the feed itself
    return {"feed": FEED_CONSUMES, **CONSUMER_GROUPS}


def channel_id(schema: type[Payload]) -> str:
    return f"{schema.TYPE}.v{schema.VERSION}"


def message_id(schema: type[Payload]) -> str:
    return f"{schema.__name__}V{schema.VERSION}"


def lane_of(schema: type[Payload]) -> str:
    from pumpflow.common.bus.dispatch import publish_lane

    return publish_lane(schema, keyless=schema.KEY_FIELD is None)


def address_of(schema: type[Payload]) -> str:
    """The routing key, with ``{partition}`` where a keyed event's partition goes."""
    from pumpflow.common.bus.routing import routing_key

    if schema.KEY_FIELD is None:
        return routing_key(schema.TYPE, schema.VERSION, None)
    prefix = routing_key(schema.TYPE, schema.VERSION, 0).rsplit(".", 1)[0]
    return f"{prefix}.{{partition}}"


def queue_of(namespace: str, group: str, schema: type[Payload]) -> str:
    """The queue ``group`` receives ``schema``'s events on (RabbitMQ transport)."""
    from pumpflow.common.bus.routing import broadcast_queue, critical_queue, partition_queue
    from pumpflow.common.runtime.topology import SHARED_KEYLESS

    keyed = schema.KEY_FIELD is not None
    # a keyless event goes to each replica's own queue, or to the group's shared one
    own = "" if keyed or group in SHARED_KEYLESS else ".<replica>"
    if schema.CRITICAL:
        return f"{namespace}.{critical_queue(group)}{own}"
    if keyed:
        return f"{namespace}.{partition_queue(group, 0)[:-2]}{{NN}}"
    return f"{namespace}.{broadcast_queue(group)}{own}"


def _lane_text(schema: type[Payload]) -> str:
    from pumpflow.common.bus.dispatch import BROADCAST, CRITICAL, PARTITION

    lane = lane_of(schema)
    if lane == CRITICAL:
        return "critical: its own queue and channel, never behind a backlog of trades"
    if lane == BROADCAST:
        return (
            "broadcast: keyless, one queue per replica, every replica gets it (a group taking "
            "keyless events shared: one queue, one replica at a time)"
        )
    assert lane == PARTITION
    return f"partition: ordered per `{schema.KEY_FIELD}`, one queue per partition"


def _summary(schema: type) -> str | None:
    doc = (schema.__doc__ or "").strip()
    if not doc or doc.startswith(("Base of", "A base")):
        return None
    return " ".join(doc.split("\n\n", 1)[0].split())


def asyncapi_document(namespace: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every registered event type (``namespace``: the
    settings' default)."""
    from pumpflow.common.bus.dispatch import Bindings
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.bus.routing import DEFAULT_PARTITIONS, partition_of
    from pumpflow.common.runtime.settings import CommonSettings
    from pumpflow.common.runtime.topology import PUBLISHERS

    fields = CommonSettings.model_fields
    namespace = namespace or fields["namespace"].default
    bus = RabbitMQBus(url=fields["amqp_url"].default, namespace=namespace, source="catalogue")
    schemas = sorted(registered().values(), key=lambda s: (s.TYPE, s.VERSION))
    (envelope, *payloads), components = msgspec.json.schema_components(
        [Event, *schemas], ref_template=SCHEMA_REF
    )
    components[ENVELOPE] = components.pop(Event.__name__)
    components[ENVELOPE]["description"] = _summary(Event)
    envelope = {"$ref": SCHEMA_REF.format(name=ENVELOPE)}
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for schema, payload in zip(schemas, payloads, strict=True):
        channel, message = channel_id(schema), message_id(schema)
        messages[message] = _drop_none({
            "name": schema.TYPE,
            "title": schema.__name__,
            "summary": _summary(schema),
            "contentType": "application/json",
            "payload": {
                "allOf": [envelope, {
                    "type": "object",
                    "properties": {
                        "type": {"const": schema.TYPE},
                        "version": {"const": schema.VERSION},
                        "data": payload,
                        "key": (
                            {"type": "null"} if schema.KEY_FIELD is None
                            else {"type": "string", "description": f"data.{schema.KEY_FIELD}"}
                        ),
                    },
                }],
            },
            "x-pumpflow-key": schema.KEY_FIELD,
            "x-pumpflow-lane": lane_of(schema),
        })  # fmt: skip
        parameters = {}
        if schema.KEY_FIELD is not None:
            parameters["partition"] = {
                "description": (
                    f"p00..p{DEFAULT_PARTITIONS - 1:02d} (PUMPFLOW_PARTITIONS, default "
                    f"{DEFAULT_PARTITIONS}): crc32 of `{schema.KEY_FIELD}` modulo the partitions"
                ),
                "examples": [f"p{partition_of('example', DEFAULT_PARTITIONS):02d}"],
            }
        channels[channel] = _drop_none({
            "address": address_of(schema),
            "title": schema.TYPE,
            "description": _lane_text(schema),
            "parameters": parameters or None,
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
            "bindings": {"amqp": {
                "is": "routingKey",
                "exchange": {"name": bus.exchange_name, "type": "topic", "durable": True,
                             "autoDelete": False, "vhost": "/"},
                "bindingVersion": AMQP_BINDING,
            }},
        })  # fmt: skip
    operations: dict[str, Any] = {}
    by_type = {s.TYPE: s for s in schemas}
    for service, event_types in PUBLISHERS.items():
        for event_type in event_types:
            schema = by_type[event_type]
            channel, message = channel_id(schema), message_id(schema)
            operations[f"{service}.send.{channel}"] = {
                "action": "send",
                "title": f"{service} publishes {event_type}",
                "channel": {"$ref": f"#/channels/{channel}"},
                "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
                "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING}},
                "x-pumpflow-service": service,
            }
    for group, patterns in consumer_groups().items():
        bindings = Bindings.of_patterns(patterns, 1)
        for event_type in sorted({*bindings.partition, *bindings.critical}):
            schema = by_type[event_type]
            channel, message = channel_id(schema), message_id(schema)
            operations[f"{group}.receive.{channel}"] = {
                "action": "receive",
                "title": f"{group} receives {event_type}",
                "channel": {"$ref": f"#/channels/{channel}"},
                "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
                "x-pumpflow-group": group,
                "x-pumpflow-queue": queue_of(namespace, group, schema),
                "x-pumpflow-dead-letters": bus.dlq_name(group),
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "pumpflow events",
            "version": "1",
            "description": (
                "The versioned events the pumpflow services exchange over RabbitMQ, "
                f"generated from the code by `{REFRESH}`. Every message is the envelope "
                "with its type's payload in `data`, or a JSON array of up to 64 such "
                "envelopes: a partition's consecutive events of one routing key published "
                "together (critical and keyless events always go alone), which consumers "
                "take one by one; a version only ever gains optional "
                "fields, anything else is a new major version on a channel of its own. "
                f"Names are for the default namespace `{namespace}` (PUMPFLOW_NAMESPACE); "
                f"every queue dead-letters into `{bus.dlx_name}`, to its group's DLQ. In a "
                "routing key, `{partition}` is the key's partition, `p00` to "
                f"`p{DEFAULT_PARTITIONS - 1:02d}` (PUMPFLOW_PARTITIONS, default "
                f"{DEFAULT_PARTITIONS}): crc32 of the key modulo the partitions."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": bus.url.rsplit("@", 1)[-1].rstrip("/"),
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "PUMPFLOW_AMQP_URL",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(components.items()))},
    }


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


# ------------------------------------------------------------------ markdown


def _type_text(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " \\| ".join(_type_text(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type_text(schema.get('items', {}))}"
    return " \\| ".join(kind) if isinstance(kind, list) else kind


def _field_rows(schema: Mapping[str, Any]) -> list[str]:
    required = set(schema.get("required", ()))
    rows = ["| field | type | required |", "|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        rows.append(f"| `{name}` | {_type_text(prop)} | {'yes' if name in required else ''} |")
    return rows


def markdown(document: Mapping[str, Any]) -> str:
    """The catalogue for reading: the channels, who consumes them, every payload's fields."""
    info, schemas = document["info"], document["components"]["schemas"]
    consumers: dict[str, list[str]] = {}
    publishers: dict[str, list[str]] = {}
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"].rsplit("/", 1)[-1]
        if operation["action"] == "send":
            publishers.setdefault(channel, []).append(operation["x-pumpflow-service"])
            continue
        consumers.setdefault(channel, []).append(
            f"{operation['x-pumpflow-group']} (`{operation['x-pumpflow-queue']}`)"
        )
    exchange = next(iter(document["channels"].values()))["bindings"]["amqp"]["exchange"]
    lines = [
        "# Event catalogue",
        "",
        f"<!-- generated by `{REFRESH}` from the code; do not edit -->",
        "",
        info["description"],
        "",
        f"AsyncAPI 3.0: [{ASYNCAPI_FILE}]({ASYNCAPI_FILE}). Exchange `{exchange['name']}` "
        f"({exchange['type']}).",
        "",
        "| event | routing key | key | lane | published by | consumed by |",
        "|---|---|---|---|---|---|",
    ]
    for name, channel in document["channels"].items():
        message = document["components"]["messages"][
            next(iter(channel["messages"].values()))["$ref"].rsplit("/", 1)[-1]
        ]
        lines.append(
            f"| [{name}](#{name.replace('.', '')}) | `{channel['address']}` | "
            f"{message.get('x-pumpflow-key') or '-'} | {message['x-pumpflow-lane']} | "
            f"{', '.join(publishers.get(name, [])) or '-'} | "
            f"{'<br>'.join(consumers.get(name, [])) or '-'} |"
        )
    lines += ["", "## Envelope", "", schemas[ENVELOPE]["description"], "",
              *_field_rows(schemas[ENVELOPE])]  # fmt: skip
    for name, channel in document["channels"].items():
        message_ref = next(iter(channel["messages"].values()))["$ref"]
        message = document["components"]["messages"][message_ref.rsplit("/", 1)[-1]]
        payload = message["payload"]["allOf"][1]["properties"]["data"]
        title = payload["$ref"].rsplit("/", 1)[-1]
        lines += ["", f"## {name}", "", f"`{title}`: {channel['description']}."]
        if message.get("summary"):
            lines += ["", message["summary"]]
        lines += ["", *_field_rows(schemas[title])]
    nested = sorted(
        set(schemas) - {ENVELOPE}
        - {m["payload"]["allOf"][1]["properties"]["data"]["$ref"].rsplit("/", 1)[-1]
           for m in document["components"]["messages"].values()}
    )  # fmt: skip
    for title in nested:
        lines += ["", f"## {title}", ""]
        if schemas[title].get("description"):
            lines += [" ".join(schemas[title]["description"].split()), ""]
        lines += _field_rows(schemas[title])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the files


def rendered() -> dict[str, str]:
    """File name -> the content the code gives it."""
    document = asyncapi_document()
    return {
        ASYNCAPI_FILE: json.dumps(document, indent=2, ensure_ascii=False) + "\n",
        MARKDOWN_FILE: markdown(document),
    }


def stale(directory: Path = DOCS) -> list[str]:
    """The catalogue files in ``directory`` that differ from the code's (or are missing)."""
    found = []
    for name, content in rendered().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            found.append(name)
    return found


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "catalogue",
        help="write the event catalogue (AsyncAPI and markdown) from the code",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", metavar="DIR", type=Path, default=DOCS, help=f"directory to write ({DOCS})"
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if the files are stale"
    )
    parser.set_defaults(handler=catalogue_command)


def catalogue_command(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: not a directory")
    if args.check and not args.out.exists():
        raise UsageError(f"--out {args.out}: no such directory")
    if args.check:
        outdated = stale(args.out)
        if outdated:
            print(f"pumpflow catalogue: {', '.join(outdated)} in {args.out} differ from the "
                  f"code; run `{REFRESH}` to refresh", file=sys.stderr)  # fmt: skip
            return 1
        print(f"pumpflow catalogue: {args.out} is up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in rendered().items():
        (args.out / name).write_text(content, encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0
