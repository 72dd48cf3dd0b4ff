"""Frame decoding: every real frame of the reference, malformed ones and hostile ones."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pumpflow.common import curve
from pumpflow.common.events import (
    EventValidationError,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    encode_payload,
)
from pumpflow.common.features.inputs import trade_input
from pumpflow.common.pumpportal import (
    API_KEY_REQUIRED,
    CURVE_TOLERANCE,
    MAX_FRAME_BYTES,
    MAX_KEYS_PER_MESSAGE,
    ControlFrame,
    FrameKind,
    chunk_keys,
    classify_frame,
    decode_frame,
    decode_token_frame,
    frame_kind,
    method_message,
    redact,
    with_api_key,
)
from pumpflow.common.testing.frames import HypothesisDraws, hostile_frame
from pumpflow.feed import reference_frames as ref


def test_create_frame_decodes_with_exact_types():
    payload = decode_frame(ref.CREATE)
    assert type(payload) is TokenCreated
    assert payload.mint == "8yZ1rj5nHbUFuCbnoowE6rHLZYiuTe1tbxEskgzUpump"
    assert payload.name == "Cash Elon "  # trailing space kept
    assert payload.solAmount == 0.059259258 and type(payload.solAmount) is float
    assert payload.initialBuy == 2115327.702796
    assert payload.is_mayhem_mode is True
    assert payload.pool == "pump"
    assert classify_frame(ref.CREATE) is FrameKind.CREATE
    assert frame_kind(payload) is FrameKind.CREATE


def test_sell_frame_keeps_integer_zero_balance():
    payload = decode_frame(ref.SELL)
    assert type(payload) is TokenTrade
    assert payload.txType == "sell"
    assert payload.newTokenBalance == 0 and type(payload.newTokenBalance) is int
    assert payload.tokenAmount == 36189.104326
    assert classify_frame(ref.SELL) is FrameKind.SELL


def test_old_buy_frame_without_sol_amount_or_pool():
    payload = decode_frame(ref.OLD_BUY.decode())  # text frames decode too
    assert type(payload) is TokenTrade
    assert payload.txType == "buy"
    assert payload.solAmount is None and payload.pool is None
    assert b"solAmount" not in encode_payload(payload)
    assert classify_frame(ref.OLD_BUY) is FrameKind.BUY


def test_migrate_frame_has_four_keys():
    payload = decode_frame(ref.MIGRATE)
    assert type(payload) is TokenMigrated
    assert msgspec.json.decode(encode_payload(payload)) == msgspec.json.decode(ref.MIGRATE)
    assert classify_frame(ref.MIGRATE) is FrameKind.MIGRATE


@pytest.mark.parametrize("raw", [ref.CREATE, ref.SELL, ref.OLD_BUY, ref.MIGRATE])
def test_reencoded_payload_equals_frame_field_for_field(raw):
    payload = decode_frame(raw)
    original = msgspec.json.decode(raw)
    again = msgspec.json.decode(encode_payload(payload))
    assert again == original
    assert {k: type(v) for k, v in again.items()} == {k: type(v) for k, v in original.items()}


def test_integer_sol_amount_stays_integer():
    raw = ref.CREATE.replace(b'"solAmount": 0.059259258', b'"solAmount": 2')
    payload = decode_frame(raw)
    assert payload.solAmount == 2 and type(payload.solAmount) is int


@pytest.mark.parametrize(
    ("raw", "kind", "is_ack"),
    [
        (ref.ACK_NEW_TOKEN, FrameKind.CONTROL, True),
        (ref.ACK_MIGRATION, FrameKind.CONTROL, True),
        (ref.ACK_KEYS, FrameKind.CONTROL, True),
        (ref.API_KEY_MESSAGE, FrameKind.CONTROL, False),
        (ref.ERROR_STRING, FrameKind.ERROR, False),
        (ref.ERROR_LIST, FrameKind.ERROR, False),
    ],
)
def test_control_and_error_frames(raw, kind, is_ack):
    frame = decode_frame(raw)
    assert type(frame) is ControlFrame
    assert frame.kind is kind
    assert frame.is_ack is is_ack
    assert classify_frame(raw) is kind


def test_api_key_message_is_recognised():
    frame = decode_frame(ref.API_KEY_MESSAGE)
    assert frame.message == API_KEY_REQUIRED
    assert frame.needs_api_key
    assert decode_frame(ref.ERROR_LIST).text == "['bad key', 'too many keys']"


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b"", None, "not JSON"),
        (b"{not json", None, "not JSON"),
        (b"[1, 2]", None, "expected an object"),
        (b'{"message": "\xff\xfe"}', None, "not UTF-8"),
        (ref.CREATE.replace(b"Cash Elon ", b"Cash \xff"), None, "not UTF-8"),
        (b'{"foo": 1}', "txType", "no `txType`"),
        (b'{"message": 5}', "message", "Expected `str`"),
        (b'{"txType": 3, "mint": "x"}', "txType", "Expected `str`"),
        (ref.SELL.replace(b'"sell"', b'"swap"'), "txType", "unknown txType 'swap'"),
        (ref.SELL.replace(b'"tokenAmount": 36189.104326, ', b""), "tokenAmount", "missing"),
        (ref.SELL.replace(b"36189.104326", b'"36189"'), "tokenAmount", "Expected `int | float`"),
        (ref.CREATE.replace(b'"name": "Cash Elon "', b'"name": null'), "name", "Expected `str`"),
        (
            ref.MIGRATE.replace(
                b'"mint": "DU8QWqR361yn4VQbRjYke4vdaKQYcfvDHsn2bx2cpump"', b'"mint": ""'
            ),
            "mint",
            "must not be empty",
        ),
        (ref.SELL.replace(b"30.03733572726111", b"-1.5"), "vSolInBondingCurve", "must be within"),
        (ref.SELL.replace(b"36189.104326", b"-3"), "tokenAmount", "must be within"),
    ],
)
def test_malformed_frames_name_field_and_reason(raw, field, reason):
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == field
    assert reason in info.value.reason


def test_escaped_tx_type_still_decodes():
    raw = ref.SELL.replace(b'"txType": "sell"', b'"txType": "s\\u0065ll"')
    payload = decode_frame(raw)
    assert type(payload) is TokenTrade and payload.txType == "sell"


def test_tx_type_inside_a_string_value_does_not_confuse_the_sniffer():
    raw = ref.CREATE.replace(b'"name": "Cash Elon "', b'"name": "txType"')
    assert decode_frame(raw).name == "txType"


def test_decode_token_frame_rejects_control_frames():
    with pytest.raises(EventValidationError, match="not a token event"):
        decode_token_frame(ref.ACK_KEYS)
    assert type(decode_token_frame(ref.SELL)) is TokenTrade


def test_client_messages_and_limits():
    assert msgspec.json.decode(method_message("subscribeNewToken")) == {
        "method": "subscribeNewToken"
    }
    assert msgspec.json.decode(method_message("subscribeTokenTrade", ["a", "b"])) == {
        "method": "subscribeTokenTrade",
        "keys": ["a", "b"],
    }
    with pytest.raises(ValueError, match="at most 5000"):
        method_message("subscribeTokenTrade", ["k"] * (MAX_KEYS_PER_MESSAGE + 1))
    with pytest.raises(ValueError, match="unknown"):
        method_message("subscribeEverything")
    chunks = chunk_keys([str(i) for i in range(12_001)])
    assert [len(c) for c in chunks] == [5000, 5000, 2001]


def test_api_key_is_appended_and_redacted():
    url = with_api_key("wss://pumpportal.fun/api/data", "s3cr3t")
    assert url == "wss://pumpportal.fun/api/data?api-key=s3cr3t"
    assert with_api_key("ws://h/x?a=1", "k") == "ws://h/x?a=1&api-key=k"
    assert (
        redact(f"connect to {url} failed")
        == "connect to wss://pumpportal.fun/api/data?api-key=*** failed"
    )
    assert "s3cr3t" not in redact("key s3cr3t leaked", "s3cr3t")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (ref.SELL.replace(b"36189.104326", b"1e999"), "tokenAmount"),  # inf
        (ref.CREATE.replace(b"2115327.702796", b"-1"), "initialBuy"),
        (ref.CREATE.replace(b'"solAmount": 0.059259258', b'"solAmount": -2'), "solAmount"),
        (
            ref.OLD_BUY.replace(b'"newTokenBalance":30582206.734745', b'"newTokenBalance":-1'),
            "newTokenBalance",
        ),
        (ref.CREATE.replace(b"1070884672.297204", b"0"), "vTokensInBondingCurve"),
        (
            ref.SELL.replace(
                b'"traderPublicKey": "3c6KJRkWtYoGHokK1x1YrYUsNUT672J3RHRgsodhC6KJ"',
                b'"traderPublicKey": ""',
            ),
            "traderPublicKey",
        ),
    ],
)
def test_impossible_values_are_rejected(raw, field):
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == field


# --------------------------------------------------------------------------------------
# Every field bounded, as the protocol justifies.

SELL_SIGNATURE = (
    b"5PEnuUTTiqyEoeXtSdFPC38pY1bFCXFAFXKq52WQBCUPzC8sJLhxNDxPDB9YBrQWZDxB6GTzJcPKH399ZpwUP1LY"
)
SELL_MINT = b"14k7LpDRKvyVuMWfGe1vB5ByoQh1yUQPetApMBLuzw1f"
SELL_TRADER = b"3c6KJRkWtYoGHokK1x1YrYUsNUT672J3RHRgsodhC6KJ"
SELL_CURVE = b"2bQpbWV1FYiddhyEceQf3FuviVPd4JQKYnptHnCEGKR5"


def test_a_signature_of_10_kb_is_the_frames_error_naming_the_field():
    raw = ref.SELL.replace(SELL_SIGNATURE, b"5" * 10_024)
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == "signature"
    assert "64 to 88 base58 characters, got 10,024" in info.value.reason


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (ref.SELL.replace(SELL_SIGNATURE, SELL_SIGNATURE + b"5"), "signature"),  # 89
        (ref.SELL.replace(SELL_SIGNATURE, SELL_SIGNATURE[:63]), "signature"),
        (ref.SELL.replace(SELL_MINT, SELL_MINT + b"z"), "mint"),  # 45
        (ref.SELL.replace(SELL_MINT, SELL_MINT[:31]), "mint"),
        (ref.SELL.replace(SELL_TRADER, SELL_TRADER * 200), "traderPublicKey"),
        (ref.SELL.replace(SELL_CURVE, SELL_CURVE * 200), "bondingCurveKey"),
        (ref.SELL.replace(b'"pool": "pump"', b'"pool": "' + b"p" * 33 + b'"'), "pool"),
        (ref.SELL.replace(b'"pool": "pump"', b'"pool": "PUMP"'), "pool"),
        (ref.MIGRATE.replace(b'"pump-amm"', b'"' + b"a" * 10_000 + b'"'), "pool"),
        (ref.CREATE.replace(b'"Cash Elon "', b'"' + b"N" * 33 + b'"'), "name"),
        (ref.CREATE.replace(b'"CASHELON"', b'"' + b"S" * 14 + b'"'), "symbol"),
        (ref.CREATE.replace(b'"https://ipfs.io', b'"https://' + b"i" * 200), "uri"),
    ],
)
def test_every_text_field_has_its_bound(raw, field):
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == field


@pytest.mark.parametrize("char", [b"0", b"O", b"I", b"l", b"-", b"\\u0000", b"\\u00e9", b" "])
def test_a_key_with_a_character_outside_base58_is_rejected_not_stored_altered(char):
    # a NUL or any other non-base58 character would make the stored mint differ from the key
    raw = ref.SELL.replace(SELL_MINT, SELL_MINT[:20] + char + SELL_MINT[21:])
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == "mint"


def test_the_bounds_admit_every_length_a_real_key_can_have():
    # 64 bytes encode to 64..88 base58 characters (86 and 87 are real), 32 bytes to 32..44
    for signature in (SELL_SIGNATURE[:86], SELL_SIGNATURE[:64], b"1" * 64):
        assert decode_frame(ref.SELL.replace(SELL_SIGNATURE, signature)).signature == (
            signature.decode()
        )
    for mint in (SELL_MINT[:43], b"1" * 32):
        assert decode_frame(ref.SELL.replace(SELL_MINT, mint)).mint == mint.decode()
    name = "Émoji 😀 " + "x" * 24  # 32 characters, more bytes
    created = decode_frame(ref.CREATE.replace(b"Cash Elon ", name.encode()))
    assert created.name == name and len(name) == 32


# --------------------------------------------------------------------------------------
# No exception but the frame's own error escapes the decoder.


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize(
    "wrap",
    [
        lambda nested: nested,
        lambda nested: ref.SELL[:-1] + b', "x": ' + nested + b"}",
        lambda nested: b'{"message": ' + nested + b"}",
        lambda nested: b'{"errors": ' + nested + b"}",
    ],
)
def test_a_frame_nested_too_deep_is_its_own_error(depth, wrap):
    raw = wrap(b"[" * depth + b"]" * depth)
    with pytest.raises(EventValidationError, match="nested too deep"):
        decode_frame(raw)
    with pytest.raises(EventValidationError, match="nested too deep"):
        classify_frame(raw)


def test_a_frame_over_the_size_limit_says_so():
    raw = ref.SELL[:-1] + b', "pad": "' + b"x" * MAX_FRAME_BYTES + b'"}'
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.reason == (
        f"frame of {len(raw):,} bytes over the limit of {MAX_FRAME_BYTES:,}"
    )


def test_a_text_frame_with_a_lone_surrogate_is_not_utf8():
    with pytest.raises(EventValidationError, match="not UTF-8"):
        decode_frame('{"message": "\ud800"}')


def test_a_field_the_decoder_skips_must_be_utf8_too():
    # the frame is stored as text: bytes that are not UTF-8 anywhere in it are refused
    with pytest.raises(EventValidationError, match="not UTF-8"):
        decode_frame(ref.SELL[:-1] + b', "extra": "\xff"}')


# --------------------------------------------------------------------------------------
# Numbers within the curve's physical ranges and consistent with each other.


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (ref.SELL.replace(b"28.028628070587033", b"-5"), "marketCapSol"),
        (ref.SELL.replace(b"28.028628070587033", b"1e308"), "marketCapSol"),
        (ref.SELL.replace(b"28.028628070587033", b"0"), "marketCapSol"),
        (ref.SELL.replace(b"28.028628070587033", b"1" + b"0" * 400), "marketCapSol"),
        (ref.SELL.replace(b"28.028628070587033", b"28.1"), "marketCapSol"),
        (
            ref.SELL.replace(b"30.03733572726111", b"1e308").replace(
                b"1071666285.328535", b"1e-300"
            ),
            "vSolInBondingCurve",
        ),
        (ref.SELL.replace(b"1071666285.328535", b"1" + b"0" * 400), "vTokensInBondingCurve"),
        # each within its range, but off the constant product
        (ref.SELL.replace(b"30.03733572726111", b"40.0"), "vTokensInBondingCurve"),
        (ref.SELL.replace(b"36189.104326", b"3e9"), "tokenAmount"),
        (ref.SELL.replace(b'"newTokenBalance": 0', b'"newTokenBalance": 1e300'), "newTokenBalance"),
        (ref.SELL.replace(b"0.001014365", b"1000"), "solAmount"),
        (ref.CREATE.replace(b"2115327.702796", b"800000000"), "initialBuy"),
    ],
)
def test_numbers_outside_the_curves_physics_are_rejected(raw, field):
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == field


def test_the_completed_curve_and_a_mayhem_agents_sales_are_within_range():
    done = curve.CurveState(v_sol=curve.COMPLETE_VIRTUAL_SOL_RESERVES, v_tokens=279_900_000.0)
    flooded = curve.CurveState(v_sol=curve.MIN_VIRTUAL_SOL_RESERVES,
                               v_tokens=curve.MAX_VIRTUAL_TOKEN_RESERVES)  # fmt: skip
    for state in (done, flooded):
        frame = msgspec.json.decode(ref.SELL) | {
            "vSolInBondingCurve": state.v_sol,
            "vTokensInBondingCurve": state.v_tokens,
            "marketCapSol": state.market_cap_sol,
        }
        assert decode_frame(msgspec.json.encode(frame)).vTokensInBondingCurve == state.v_tokens


# --------------------------------------------------------------------------------------
# One reading of a frame: no key twice, routed by the value it is decoded with.


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (ref.SELL.replace(b'"txType": "sell"', b'"txType": "buy", "txType": "sell"'), "txType"),
        (ref.SELL.replace(b'"txType": "sell"', b'"txType": "sell", "txType": "buy"'), "txType"),
        (ref.SELL.replace(b'"txType": "sell"', b'"txType":"sell","tx\\u0054ype":"buy"'), "txType"),
        (ref.SELL.replace(b'"pool": "pump"', b'"mint": "x", "pool": "pump"'), "mint"),
        (ref.MIGRATE.replace(b'"txType"', b'"pool": "pump", "txType"'), "pool"),
        (ref.SELL[:-1] + b', "x": 1, "x": 2}', "x"),
        (b'{"message": "a", "message": "b"}', "message"),
    ],
)
def test_a_key_given_twice_makes_the_frame_ambiguous(raw, field):
    with pytest.raises(EventValidationError) as info:
        decode_frame(raw)
    assert info.value.field == field
    assert "more than once" in info.value.reason


def test_a_field_name_used_as_a_value_or_nested_is_no_repetition():
    raw = ref.CREATE.replace(b'"name": "Cash Elon "', b'"name": "mint"')
    assert decode_frame(raw).name == "mint"
    nested = ref.SELL[:-1] + b', "extra": {"mint": "x", "txType": "buy"}}'
    assert decode_frame(nested).txType == "sell"
    spaced = ref.SELL.replace(b'"txType": "sell"', b'"txType" : "sell"')
    assert decode_frame(spaced).txType == "sell"


def test_a_frame_is_routed_by_the_txtype_it_is_decoded_with():
    # a key that merely contains `"txType": "create"` must not route a sell as a creation
    raw = ref.SELL.replace(b'"txType": "sell"', b'"x\\"txType": "create", "txType": "sell"')
    assert classify_frame(raw) is FrameKind.SELL
    payload = decode_frame(raw)
    assert type(payload) is TokenTrade and frame_kind(payload) is FrameKind.SELL


# --------------------------------------------------------------------------------------
# Fuzzed: hostile frames (the benchmark runs this over a million inputs).

SEEDS = (
    ref.CREATE, ref.SELL, ref.OLD_BUY, ref.MIGRATE, ref.ACK_KEYS, ref.API_KEY_MESSAGE,
    ref.ERROR_STRING, ref.ERROR_LIST,
)  # fmt: skip


@settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_a_hostile_frame_gets_a_payload_or_its_validation_error_and_nothing_else(data):
    _, frame = hostile_frame(HypothesisDraws(data), SEEDS)
    try:
        payload = decode_frame(frame)
    except EventValidationError:
        return
    if isinstance(payload, ControlFrame):
        return
    # what passes is safe downstream: keys as sent, curve values finite and consistent
    assert encode_payload(payload).decode().count(payload.mint) >= 1
    if isinstance(payload, TokenMigrated):
        return
    error = curve.frame_consistency_error(
        payload.vSolInBondingCurve, payload.vTokensInBondingCurve, payload.marketCapSol
    )
    assert error <= CURVE_TOLERANCE
    trade = trade_input(payload, 0.0)
    numbers = (trade.lamports, trade.tokens, trade.new_balance, trade.v_sol, trade.v_tokens)
    assert all(math.isfinite(n) for n in numbers)
