"""Frame decoding: every real frame of the reference, and malformed ones."""

from __future__ import annotations

import msgspec
import pytest

from pumpflow.common.events import (
    EventValidationError,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    encode_payload,
)
from pumpflow.common.pumpportal import (
    API_KEY_REQUIRED,
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
        (ref.SELL.replace(b"30.03733572726111", b"-1.5"), "vSolInBondingCurve", "positive"),
        (ref.SELL.replace(b"36189.104326", b"-3"), "tokenAmount", "non-negative"),
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
