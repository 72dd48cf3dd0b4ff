"""Samples of what pumpflow stores and sends, encoded by one release, for upgrade tests.

A deployment upgrades in place: the new code reads the Redis records, the stored JSON
and the queued messages an older release wrote, and during a rolling upgrade the older
replicas read the newer ones' messages. This module builds one sample of each such
type, every field set to a value of its own (none at its default, so a field moved in
an ``array_like`` struct decodes to another's value and shows), and writes each as the
running code encodes it, with its fields by name (``expected.msgpack``).

Run with a release's own sources first on the python path
(``scripts/upgrade_fixtures.sh <commit>`` does), it writes that release's fixtures:

    python tests/upgrade/samples.py write DIR     # encode with the code on the path
    python tests/upgrade/samples.py check DIR     # decode DIR's with the code on the path

``tests/upgrade/test_upgrade.py`` decodes each release's fixtures with this tree's code.
It uses only what every release has (msgspec's type information, the types by name),
so it runs on older checkouts unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

#: what is stored or queued across an upgrade: name -> (type, codec). ``msgpack`` and
#: ``json`` are msgspec's plain encodings of the type, as its store writes it
PERSISTED: dict[str, tuple[str, str]] = {
    # Redis: a keyed consumer's record per key, and each service's state in it
    "keyed.record": ("pumpflow.common.consumer.keyed:Record", "msgpack"),
    "features.state": ("pumpflow.common.features.state:StateSnapshot", "msgpack"),
    "activity.state": ("pumpflow.common.activity.processor:ActivityState", "msgpack"),
    "model.state": ("pumpflow.common.model.processor:ScoringState", "msgpack"),
    "exit.state": ("pumpflow.common.exit.processor:ExitState", "msgpack"),
    # Redis: trading's token views, the model's serving, replicas' heartbeats
    "trading.view": ("pumpflow.common.trading.decisions:TokenView", "msgpack"),
    "model.serving": ("pumpflow.model.service:Serving", "json"),
    "model.arms": ("pumpflow.common.model.arms:_TableSpec", "json"),
    "bus.heartbeat": ("pumpflow.common.bus.ownership:Heartbeat", "json"),
    # Postgres and files: model cards and label definitions, exit summaries' lines
    "model.card": ("pumpflow.common.model.card:ModelCard", "json"),
    "model.label_definition": ("pumpflow.common.model.card:LabelDefinition", "json"),
    "exit.line": ("pumpflow.common.events:ExitLine", "json"),
    # RabbitMQ: a refused token event's dead letter names it in a header
    "feed.stored_identity": ("pumpflow.feed.redrive:StoredIdentity", "json"),
}

EXPECTED = "expected.msgpack"


def resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------ building samples


class _Builder:
    """Values of a type, each scalar distinct from every other one built."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def value(self, info: Any, name: str, default: Any = msgspec.NODEFAULT) -> Any:
        n = next(self._n)
        it = msgspec.inspect
        if isinstance(info, it.StructType | it.DataclassType):
            return self.instance(info)
        if isinstance(info, it.UnionType):
            options = [t for t in info.types if not isinstance(t, it.NoneType)]
            return self.value(options[n % len(options)] if options else it.NoneType(), name)
        if isinstance(info, it.NoneType):
            return None
        if isinstance(info, it.BoolType):
            return default is not True
        if isinstance(info, it.IntType):
            return _bounded(100 + n, info)
        if isinstance(info, it.FloatType):
            return float(_bounded(n + 0.25, info))
        if isinstance(info, it.StrType):
            return f"{name}-{n}"
        if isinstance(info, it.BytesType | it.ByteArrayType | it.MemoryViewType):
            return bytes((n + i) % 256 for i in range(8))
        if isinstance(info, it.LiteralType | it.EnumType):
            values = list(info.values) if isinstance(info, it.LiteralType) else list(info.cls)
            others = [v for v in values if v != default] or values
            return others[n % len(others)]
        if isinstance(info, it.DateTimeType):
            return datetime.datetime.fromtimestamp(1.7e9 + n, tz=datetime.UTC)
        if isinstance(info, it.TupleType):
            return tuple(self.value(t, name) for t in info.item_types)
        if isinstance(info, it.VarTupleType):
            return tuple(self.value(info.item_type, name) for _ in range(2))
        if isinstance(info, it.ListType | it.SetType | it.FrozenSetType):
            items = [self.value(info.item_type, name) for _ in range(2)]
            if isinstance(info, it.ListType):
                return items
            return set(items) if isinstance(info, it.SetType) else frozenset(items)
        if isinstance(info, it.DictType):
            return {self.value(info.key_type, f"{name}-key"): self.value(info.value_type, name)}
        if isinstance(info, it.AnyType):
            return f"{name}-{n}"
        raise TypeError(f"no sample of {info!r} ({name})")

    def instance(self, info: Any) -> Any:
        kwargs = {}
        for field in info.fields:
            default = field.default if field.default is not msgspec.NODEFAULT else msgspec.NODEFAULT
            kwargs[field.name] = self.value(field.type, field.name, default)
        return info.cls(**kwargs)

    def of(self, cls: type) -> Any:
        return self.instance(msgspec.inspect.type_info(cls))


def _bounded(value: float, info: Any) -> float:
    for bound, least in ((info.ge, True), (info.gt, True), (info.le, False), (info.lt, False)):
        if bound is not None:
            value = max(value, bound + 1) if least else min(value, bound - 0.5)
    return value


def samples() -> Iterator[tuple[str, str, Any]]:
    """(name, codec, value) of every persisted type and every registered event."""
    from pumpflow.common import events

    build = _Builder()
    for name, (path, codec) in PERSISTED.items():
        yield name, codec, build.of(resolve(path))
    envelope = msgspec.inspect.type_info(events.Event)
    for (kind, version), schema in sorted(events.registered().items()):
        fields = {}
        for field in envelope.fields:
            if field.name not in ("type", "version", "data"):
                fields[field.name] = build.value(field.type, field.name, field.default)
        event = events.Event(type=kind, version=version, data=build.of(schema), **fields)
        yield f"event.{kind}.v{version}", "event", event


# ------------------------------------------------------------------ codecs


def encode(codec: str, value: Any) -> bytes:
    if codec == "msgpack":
        return msgspec.msgpack.encode(value)
    if codec == "json":
        return msgspec.json.encode(value)
    if codec == "event":
        from pumpflow.common.events import encode_event

        return encode_event(value)
    raise ValueError(codec)


def decoder(name: str, codec: str) -> Callable[[bytes], Any]:
    """How the code on the path reads ``name``'s bytes, as its store or bus does."""
    if codec == "event":
        from pumpflow.common.events import decode_event

        return decode_event
    cls = resolve(PERSISTED[name][0])
    if codec == "msgpack":
        return msgspec.msgpack.Decoder(cls).decode
    if codec == "json":
        return msgspec.json.Decoder(cls).decode
    raise ValueError(codec)


def named(value: Any) -> Any:
    """``value`` as plain data, a struct's or dataclass's fields by name (marked, so a
    field added or dropped tells from a mapping's keys)."""
    if isinstance(value, msgspec.Struct):
        return {"__struct__": {f: named(getattr(value, f)) for f in value.__struct_fields__}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {"__struct__": {f.name: named(getattr(value, f.name)) for f in fields}}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {"__map__": [[named(k), named(v)] for k, v in value.items()]}
    if isinstance(value, set | frozenset):
        return sorted((named(v) for v in value), key=repr)  # in no order of its own
    if isinstance(value, list | tuple):
        return [named(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    return value


def differences(expected: Any, got: Any, *, dropped_ok: bool, at: str = "") -> list[str]:
    """Where ``got`` (decoded by the code on the path) differs from ``expected`` (what
    the writer encoded). A struct field ``got`` lacks is a difference unless
    ``dropped_ok`` (an older reader ignores the fields added after it); a field only
    ``got`` has was added since and is left to its default."""
    if isinstance(expected, dict) and "__struct__" in expected:
        if not (isinstance(got, dict) and "__struct__" in got):
            return [f"{at or '.'}: a struct decoded as {got!r}"]
        mine, theirs = expected["__struct__"], got["__struct__"]
        found = []
        for field, value in mine.items():
            if field in theirs:
                where = f"{at}.{field}"
                found += differences(value, theirs[field], dropped_ok=dropped_ok, at=where)
            elif not dropped_ok:
                found.append(f"{at}.{field}: lost (the reader has no such field)")
        return found
    if isinstance(expected, dict) and "__map__" in expected:
        if not (isinstance(got, dict) and "__map__" in got):
            return [f"{at or '.'}: a mapping decoded as {got!r}"]
        if len(expected["__map__"]) != len(got["__map__"]):
            return [f"{at}: {len(expected['__map__'])} entries decoded as {len(got['__map__'])}"]
        found = []
        for (k1, v1), (k2, v2) in zip(expected["__map__"], got["__map__"], strict=True):
            found += differences(k1, k2, dropped_ok=dropped_ok, at=f"{at}[key]")
            found += differences(v1, v2, dropped_ok=dropped_ok, at=f"{at}[{k1!r}]")
        return found
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return [f"{at}: {expected!r} decoded as {got!r}"]
        found = []
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            found += differences(a, b, dropped_ok=dropped_ok, at=f"{at}[{i}]")
        return found
    same = expected == got or (
        isinstance(expected, float)
        and isinstance(got, float)
        and math.isnan(expected)
        and math.isnan(got)
    )
    if same and type(expected) is type(got):
        return []
    return [f"{at}: {expected!r} decoded as {got!r}"]


# ------------------------------------------------------------------ fixtures


def write(directory: Path) -> list[str]:
    """Write every sample's bytes and their fields by name under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, codec, value in samples():
        (directory / f"{name}.{codec}").write_bytes(encode(codec, value))
        expected[name] = named(value)
    (directory / EXPECTED).write_bytes(msgspec.msgpack.encode(expected))
    return sorted(expected)


def fixtures(directory: Path) -> Iterator[tuple[str, str, bytes, Any]]:
    """(name, codec, bytes, fields by name) of each fixture under ``directory``."""
    expected = msgspec.msgpack.decode((directory / EXPECTED).read_bytes())
    for name in sorted(expected):
        (path,) = directory.glob(f"{name}.*")
        yield name, path.suffix[1:], path.read_bytes(), expected[name]


def check(directory: Path, *, dropped_ok: bool) -> dict[str, list[str]]:
    """Decode ``directory``'s fixtures with the code on the path: what differs, by name
    (a type this code does not know is a difference too)."""
    problems = {}
    for name, codec, raw, expected in fixtures(directory):
        try:
            if codec != "event" and name not in PERSISTED:
                raise LookupError("not a persisted type of this code")
            found = differences(expected, named(decoder(name, codec)(raw)), dropped_ok=dropped_ok)
        except Exception as exc:  # every failure is a finding
            found = [f"does not decode: {type(exc).__name__}: {exc}"]
        if found:
            problems[name] = found
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if argv[0] == "write":
        names = write(directory)
        print(f"{len(names)} fixtures written to {directory}")
        return 0
    # a newer release's fixtures checked by an older code: the fields it added are dropped
    problems = check(directory, dropped_ok=True)
    for name, found in problems.items():
        print(f"{name}:", *found, sep="\n  ")
    print(f"{len(problems)} of the fixtures in {directory} differ")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
