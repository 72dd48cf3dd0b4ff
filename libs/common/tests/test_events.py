"""Event envelope and payload schemas: real PumpPortal frames, exact JSON types, errors."""

from __future__ import annotations

import gc
import json
from typing import Any

import msgspec
import pytest

from pumpflow.common import events as events_module
from pumpflow.common.events import (
    SHARED_VALUES_KEPT,
    Event,
    EventValidationError,
    FeaturesUpdated,
    Payload,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    decode_event,
    decode_payload,
    encode_event,
    encode_payload,
    make_event,
    register,
    registered,
    schema_for,
    source_service,
)

# Real PumpPortal frames, as they arrived.
CREATE = (
    '{"signature": "3ShNEcfKhWrvFVTwHCK7FjgWXABAZgo9Cpr2S6AGngg9xDifcQyY2mGQQ85p11vxSRvQ3B3Sbaaj'
    'obL1rfSJmyjG", "mint": "8yZ1rj5nHbUFuCbnoowE6rHLZYiuTe1tbxEskgzUpump", "traderPublicKey": '
    '"HDypasvYsG5MuABAfaTf78FVYMmYedcbefZ7pxWEhVQV", "txType": "create", "initialBuy": '
    '2115327.702796, "solAmount": 0.059259258, "bondingCurveKey": '
    '"Hgaf727Ccy1YfWAZ77otqmqW5QY8avMXi4pkbRdiomrH", "vTokensInBondingCurve": 1070884672.297204, '
    '"vSolInBondingCurve": 30.059259257999976, "marketCapSol": 28.069557848389476, "name": '
    '"Cash Elon ", "symbol": "CASHELON", "uri": "https://ipfs.io/ipfs/bafkreid55z3ln7vg3udpgagfeu'
    'mjcd7stnfqri7zkc4n227eq4vs24rdj4", "is_mayhem_mode": true, "pool": "pump"}'
)
SELL = (
    '{"signature": "5PEnuUTTiqyEoeXtSdFPC38pY1bFCXFAFXKq52WQBCUPzC8sJLhxNDxPDB9YBrQWZDxB6GTzJcPK'
    'H399ZpwUP1LY", "mint": "14k7LpDRKvyVuMWfGe1vB5ByoQh1yUQPetApMBLuzw1f", "traderPublicKey": '
    '"3c6KJRkWtYoGHokK1x1YrYUsNUT672J3RHRgsodhC6KJ", "txType": "sell", "tokenAmount": '
    '36189.104326, "solAmount": 0.001014365, "newTokenBalance": 0, "bondingCurveKey": '
    '"2bQpbWV1FYiddhyEceQf3FuviVPd4JQKYnptHnCEGKR5", "vTokensInBondingCurve": 1071666285.328535, '
    '"vSolInBondingCurve": 30.03733572726111, "marketCapSol": 28.028628070587033, "pool": "pump"}'
)
OLD_BUY = (
    '{"signature":"XGAnLe4EKCx4NNHv7soDimYZifwRndEGq1myrMDZR6DSRa6FgvcsMbpEz7XJrvRHxH6GcwPTr1oKt9j'
    'NWj5T4Uh","mint":"4Wo7nxVsPV125DW3Tr2ppPrzrnNFwidiKjWyVsifpump","traderPublicKey":"4ajMNhqWC'
    'eDVJtddbNhD3ss5N6CFZ37nV9Mg7StvBHdb","txType":"buy","tokenAmount":30582206.734745,"newTokenB'
    'alance":30582206.734745,"bondingCurveKey":"HPWxfYdBitgdK4VcevMgE1VHaKgpcKJWiJh9dFAsP6SE","vT'
    'okensInBondingCurve":977513247.598136,"vSolInBondingCurve":32.93049999996889,"marketCapSol":'
    "33.68803449046135}"
)
MIGRATE = (
    '{"signature": "3GD3ohyHT3CvGgVAuXgqtMkxy6KNMFbV875eVePZRZGmP2GTUJSkvL2hrHLzqQvTkBE9HDXbmrSea'
    'C2aUCncemVZ", "mint": "DU8QWqR361yn4VQbRjYke4vdaKQYcfvDHsn2bx2cpump", "txType": "migrate", '
    '"pool": "pump-amm"}'
)
#: the creation frame with `"solAmount": 2` (an integer) and without the newer fields
CREATE_INT_SOL_OLD = json.dumps(
    {
        **{k: v for k, v in json.loads(CREATE).items() if k not in ("is_mayhem_mode", "pool")},
        "solAmount": 2,
    }
)

FRAMES = [
    ("token.created", CREATE, TokenCreated),
    ("token.created", CREATE_INT_SOL_OLD, TokenCreated),
    ("token.trade", SELL, TokenTrade),
    ("token.trade", OLD_BUY, TokenTrade),
    ("token.migrated", MIGRATE, TokenMigrated),
]


def same_json(a: Any, b: Any) -> bool:
    """Equal values AND equal JSON types (1 and 1.0 differ; True and 1 differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(("event_type", "frame", "schema"), FRAMES)
def test_real_frames_decode_and_re_encode_to_the_same_json(event_type, frame, schema):
    payload = decode_payload(event_type, 1, frame)
    assert type(payload) is schema
    original = json.loads(frame)
    for name, value in original.items():
        decoded = getattr(payload, name)
        assert same_json(decoded, value), f"{name}: {decoded!r} is not {value!r}"
    assert same_json(json.loads(encode_payload(payload)), original)


def test_numbers_keep_their_json_type():
    created = decode_payload("token.created", 1, CREATE)
    assert type(created.initialBuy) is float and created.initialBuy == 2115327.702796
    assert type(created.solAmount) is float and created.solAmount == 0.059259258
    assert created.is_mayhem_mode is True and created.pool == "pump"
    assert created.name == "Cash Elon "  # trailing space kept
    assert type(decode_payload("token.created", 1, CREATE_INT_SOL_OLD).solAmount) is int
    sell = decode_payload("token.trade", 1, SELL)
    assert type(sell.newTokenBalance) is int and sell.newTokenBalance == 0


def test_newer_optional_fields_stay_absent_in_older_frames():
    old_buy = decode_payload("token.trade", 1, OLD_BUY)
    assert old_buy.solAmount is None and old_buy.pool is None
    encoded = json.loads(encode_payload(old_buy))
    assert "solAmount" not in encoded and "pool" not in encoded
    old_create = json.loads(encode_payload(decode_payload("token.created", 1, CREATE_INT_SOL_OLD)))
    assert "is_mayhem_mode" not in old_create and "pool" not in old_create
    # a shutdown of a producer from before request ids: a request of its own
    old_shutdown = decode_payload("system.shutdown", 1, b'{"reason": "older stop"}')
    assert old_shutdown.request_id is None
    assert json.loads(encode_payload(old_shutdown)) == {"reason": "older stop"}
    # a barrier of a trading from before request ids: of no request
    old_barrier = decode_payload("trading.barrier", 1, b'{"reason": "older stop"}')
    assert old_barrier.request_id is None and old_barrier.positions == ()
    assert json.loads(encode_payload(old_barrier)) == {"reason": "older stop"}


@pytest.mark.parametrize(("event_type", "frame", "schema"), FRAMES)
def test_token_events_round_trip_in_an_envelope(event_type, frame, schema):
    payload = decode_payload(event_type, 1, frame)
    event = make_event(payload, source="feed/r1", time=1_700_000_000.25, seq=7, causation_id="c")
    assert event.key == payload.mint
    wire = encode_event(event)
    back = decode_event(wire)
    assert back == event
    assert same_json(json.loads(wire)["data"], json.loads(frame))


def test_envelopes_are_left_out_of_the_cycle_collector():
    payload = decode_payload("token.trade", 1, SELL)
    event = make_event(payload, source="feed/r1", time=1.0, seq=1)
    assert not gc.is_tracked(event)
    assert not gc.is_tracked(decode_event(encode_event(event)))


# -- every registered schema, with a sample built from its own type information ----------


def _sample(info: msgspec.inspect.Type, name: str) -> Any:
    t = msgspec.inspect
    if isinstance(info, t.UnionType):
        concrete = [x for x in info.types if not isinstance(x, t.NoneType)]
        return _sample(concrete[-1], name)
    if isinstance(info, t.LiteralType):
        return info.values[0]
    if isinstance(info, t.StrType):
        return f"{name}-value"
    if isinstance(info, t.BoolType):
        return True
    if isinstance(info, t.IntType):
        return 3
    if isinstance(info, t.FloatType):
        return 0.5
    if isinstance(info, t.VarTupleType | t.ListType):
        return (_sample(info.item_type, name), _sample(info.item_type, name))
    if isinstance(info, t.TupleType):
        return tuple(_sample(x, name) for x in info.item_types)
    if isinstance(info, t.StructType):
        return info.cls(**{f.name: _sample(f.type, f.name) for f in info.fields})
    raise AssertionError(f"no sample for {info!r} at {name}")


def sample_payload(schema: type[Payload]) -> Payload:
    """Every field set, optional ones included, so nothing escapes the round trip."""
    return _sample(msgspec.inspect.type_info(schema), schema.__name__)


@pytest.mark.parametrize("ident", sorted(registered()), ids=lambda ident: f"{ident[0]}.v{ident[1]}")
def test_every_registered_event_type_round_trips(ident):
    schema = registered()[ident]
    assert (schema.TYPE, schema.VERSION) == ident
    assert schema_for(*ident) is schema
    payload = sample_payload(schema)
    event = make_event(payload, source="svc/r1", time=12.5, seq=1)
    assert event.key == (getattr(payload, schema.KEY_FIELD) if schema.KEY_FIELD else None)
    back = decode_event(encode_event(event))
    assert back == event
    assert type(back.data) is schema
    assert decode_payload(*ident, encode_payload(payload)) == payload


def test_the_registry_has_the_architecture_s_event_types():
    types = {t for t, _ in registered()}
    assert {
        "token.created",
        "token.trade",
        "token.migrated",
        "features.updated",
        "token.lifecycle",
        "feed.subscription",
        "model.prediction",
        "exit.order",
        "system.shutdown",
        "exit.report",
    } <= types
    assert schema_for("system.shutdown", 1).CRITICAL and schema_for("exit.order", 1).CRITICAL
    assert schema_for("system.shutdown", 1).KEY_FIELD is None


# -- bad input --------------------------------------------------------------------------


def envelope(**overrides) -> bytes:
    base = json.loads(
        encode_event(
            make_event(decode_payload("token.migrated", 1, MIGRATE), source="feed/r", time=1.0)
        )
    )
    base.update(overrides)
    if isinstance(base.get("data"), dict):
        base["data"] = {k: v for k, v in base["data"].items() if v is not ...}
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


MIGRATE_DATA = {"signature": "s", "mint": "m", "txType": "migrate"}
BAD_MESSAGES = [
    (envelope(id=...), "id", "missing required field"),
    (envelope(time="yesterday"), "time", "Expected `float`, got `str`"),
    (envelope(data=MIGRATE_DATA | {"mint": ...}), "data.mint", "missing required field"),
    (envelope(data=MIGRATE_DATA | {"txType": "hodl"}), "data.txType", "Invalid enum value"),
    (envelope(data=MIGRATE_DATA | {"mint": 5}), "data.mint", "Expected `str`, got `int`"),
    (
        envelope(type="token.trade", data=json.loads(SELL) | {"vSolInBondingCurve": "30"}),
        "data.vSolInBondingCurve",
        "Expected `int | float`, got `str`",
    ),
]


@pytest.mark.parametrize(("raw", "field", "reason"), BAD_MESSAGES)
def test_a_bad_message_names_the_field_and_the_reason(raw, field, reason):
    with pytest.raises(EventValidationError) as caught:
        decode_event(raw)
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert field in str(caught.value) and reason in str(caught.value)


def test_nested_fields_are_named_with_their_path():
    raw = envelope(
        type="exit.report",
        key=None,
        data={
            "reason": "r",
            "started_at": 1,
            "finished_at": 2,
            "positions": [{"position_id": "p"}],
        },
    )
    with pytest.raises(EventValidationError) as caught:
        decode_event(raw)
    assert caught.value.field == "data.positions[0].mint"
    assert caught.value.event_type == "exit.report"


@pytest.mark.parametrize(
    ("event_type", "version"), [("token.nonsense", 1), ("token.trade", 2), ("", 1)]
)
def test_unknown_type_or_version_raises(event_type, version):
    with pytest.raises(EventValidationError, match="unknown event type/version") as caught:
        decode_event(envelope(type=event_type, version=version))
    assert caught.value.field == "type"
    with pytest.raises(EventValidationError):
        decode_payload(event_type, version, MIGRATE)
    with pytest.raises(EventValidationError):
        schema_for(event_type, version)


def test_malformed_json_raises_the_same_error_type():
    with pytest.raises(EventValidationError, match="malformed"):
        decode_event(b"{not json")
    with pytest.raises(EventValidationError):
        decode_payload("token.trade", 1, b"[1, 2]")


def test_critical_flag_and_source_service():
    shutdown = make_event(
        schema_for("system.shutdown", 1)(reason="bye"), source="exit/host-1", time=3.0
    )
    assert isinstance(shutdown, Event)
    assert shutdown.critical and shutdown.key is None
    assert source_service(shutdown.source) == "exit"
    assert source_service("feed") == "feed"


def test_event_ids_are_unique_hex_and_a_forked_child_numbers_apart():
    import os

    from pumpflow.common.events import new_event_id

    ids = [new_event_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:16] != ids[0][:16] and child not in ids


def _vector(mint: str, names: tuple[str, ...]) -> Event:
    return make_event(
        FeaturesUpdated(
            mint=mint,
            feature_set_version="v1",
            source_seq=1,
            names=names,
            values=tuple(float(i) for i in range(len(names))),
        ),
        source="features/r1",
        time=1.0,
    )


def test_decoded_vectors_of_one_feature_set_share_their_names():
    names = ("price", "volume_60s", "buyers_60s")
    events = [decode_event(encode_event(_vector(f"mint-{i}", names))) for i in range(3)]
    payloads = [decode_payload("features.updated", 1, encode_payload(e.data)) for e in events]
    shared = events[0].data.names
    assert shared == names
    assert all(v.data.names is shared for v in events)
    assert all(p.names is shared for p in payloads)
    # another feature set's vectors keep their own names, and share them in turn
    other = ("price", "sellers_60s")
    a, b, c = (decode_event(encode_event(_vector("m", n))) for n in (other, names, other))
    assert a.data.names == other and c.data.names is a.data.names
    assert b.data.names is shared
    assert [e.data for e in events] == [_vector(f"mint-{i}", names).data for i in range(3)]


def test_shared_values_kept_are_bounded_and_stay_correct():
    sets = [(f"feature_{i}", "price") for i in range(SHARED_VALUES_KEPT * 2 + 3)]
    for _ in range(2):
        for names in sets:
            back = decode_event(encode_event(_vector("m", names)))
            assert back.data.names == names
    assert len(events_module._shared_values._kept) <= SHARED_VALUES_KEPT


def test_only_fields_of_strings_can_be_shared():
    class Amounts(Payload, frozen=True, kw_only=True):
        TYPE = "test.amounts"
        SHARED_FIELDS = ("amounts",)
        mint: str
        amounts: tuple[float, ...]

    with pytest.raises(ValueError, match="'amounts' is not a field of strings"):
        register(Amounts)
    assert ("test.amounts", 1) not in registered()
