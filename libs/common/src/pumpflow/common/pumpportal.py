"""PumpPortal's real-time WebSocket protocol: constants and frame decoding.

Shared by the feed (live frames) and the simulator (server side, dataset loader).
Token frames decode straight into the v1 payloads of :mod:`pumpflow.common.events`
with PumpPortal's field names and JSON types; control frames (``{"message": ...}``)
and error frames (``{"errors": ...}``) decode into :class:`ControlFrame`.

Hot path: the ``txType`` value is located with one regex over the raw bytes, so a
token frame is parsed once, by the decoder of its own payload type.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, Final

import msgspec

from pumpflow.common.events import (
    EventValidationError,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    validation_error,
)

DEFAULT_WS_URL: Final = "wss://pumpportal.fun/api/data"
API_KEY_PARAM: Final = "api-key"

# Client methods.
SUBSCRIBE_NEW_TOKEN: Final = "subscribeNewToken"
UNSUBSCRIBE_NEW_TOKEN: Final = "unsubscribeNewToken"
SUBSCRIBE_MIGRATION: Final = "subscribeMigration"
SUBSCRIBE_TOKEN_TRADE: Final = "subscribeTokenTrade"
UNSUBSCRIBE_TOKEN_TRADE: Final = "unsubscribeTokenTrade"
SUBSCRIBE_ACCOUNT_TRADE: Final = "subscribeAccountTrade"
UNSUBSCRIBE_ACCOUNT_TRADE: Final = "unsubscribeAccountTrade"
#: methods that take ``keys``
KEYED_METHODS: Final = frozenset(
    {
        SUBSCRIBE_TOKEN_TRADE,
        UNSUBSCRIBE_TOKEN_TRADE,
        SUBSCRIBE_ACCOUNT_TRADE,
        UNSUBSCRIBE_ACCOUNT_TRADE,
    }
)
METHODS: Final = KEYED_METHODS | {SUBSCRIBE_NEW_TOKEN, UNSUBSCRIBE_NEW_TOKEN, SUBSCRIBE_MIGRATION}

# Limits: exceeding them gets a client banned.
MAX_KEYS_PER_MESSAGE: Final = 5_000
MAX_MESSAGES_PER_SECOND: Final = 200

# Server acknowledgements and notices (control frames).
ACK_NEW_TOKEN: Final = "Successfully subscribed to token creation events."
ACK_MIGRATION: Final = "Subscribed to 'migration' events."
ACK_KEYS: Final = "Successfully subscribed to keys."
ACK_UNSUBSCRIBED_KEYS: Final = "Unsubscribed from keys."
API_KEY_REQUIRED: Final = (
    "'subscribeTokenTrade' and 'subscribeAccountTrade' methods are only available when "
    "connecting with an API key funded with at least 0.02 SOL."
)
ACKS: Final = frozenset({ACK_NEW_TOKEN, ACK_MIGRATION, ACK_KEYS, ACK_UNSUBSCRIBED_KEYS})

# Pool names seen in frames.
POOL_PUMP: Final = "pump"
POOL_PUMP_AMM: Final = "pump-amm"


class FrameKind(enum.Enum):
    """What a raw frame is. The value is the metrics label."""

    CREATE = "create"
    BUY = "buy"
    SELL = "sell"
    MIGRATE = "migrate"
    CONTROL = "control"
    ERROR = "error"


TokenPayload = TokenCreated | TokenTrade | TokenMigrated


class ControlFrame(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A frame without ``txType``: an acknowledgement, a notice or an error."""

    message: str | None = None
    #: PumpPortal sends a string or a list
    errors: Any = None

    @property
    def kind(self) -> FrameKind:
        return FrameKind.ERROR if self.errors is not None else FrameKind.CONTROL

    @property
    def is_ack(self) -> bool:
        return self.message in ACKS

    @property
    def needs_api_key(self) -> bool:
        return self.message is not None and "API key" in self.message

    @property
    def text(self) -> str:
        """Human-readable content for logs."""
        if self.errors is not None:
            return self.errors if isinstance(self.errors, str) else repr(self.errors)
        return self.message or ""


# --------------------------------------------------------------------------------------
# Decoding.

_TX_TYPE = re.compile(rb'"txType"\s*:\s*"([^"\\]*)"')
_created_decoder = msgspec.json.Decoder(TokenCreated)
_trade_decoder = msgspec.json.Decoder(TokenTrade)
_migrated_decoder = msgspec.json.Decoder(TokenMigrated)
_control_decoder = msgspec.json.Decoder(ControlFrame)
_any_decoder = msgspec.json.Decoder()

_BY_TX_TYPE: Final = {
    b"create": (FrameKind.CREATE, _created_decoder, TokenCreated.TYPE),
    b"buy": (FrameKind.BUY, _trade_decoder, TokenTrade.TYPE),
    b"sell": (FrameKind.SELL, _trade_decoder, TokenTrade.TYPE),
    b"migrate": (FrameKind.MIGRATE, _migrated_decoder, TokenMigrated.TYPE),
}
#: frame kind of each token payload's txType
KIND_OF_TX_TYPE: Final = {k.decode(): v[0] for k, v in _BY_TX_TYPE.items()}


def _as_bytes(raw: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode()
    return bytes(raw)


class _Redispatch(Exception):
    def __init__(self, tx_type: bytes):
        self.tx_type = tx_type


def _route(data: bytes):
    """Return a control frame, decoded, or the registry entry of the frame's txType."""
    match = _TX_TYPE.search(data)
    if match is None:
        try:
            return _decode_control(data)
        except _Redispatch as redo:
            tx_type = redo.tx_type
    else:
        tx_type = match.group(1)
    entry = _BY_TX_TYPE.get(tx_type)
    if entry is None:
        raise EventValidationError(
            f"unknown txType {tx_type.decode(errors='replace')!r}", field="txType"
        )
    return entry


def _not_utf8(data: bytes, event_type: str | None = None) -> EventValidationError | None:
    """Our own reason for a frame that is not UTF-8, or None if it is UTF-8.

    msgspec's wording and exception for a bad string change between releases, so the
    check is ours; it runs only once msgspec has rejected a frame, never on the hot path.
    """
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        return EventValidationError(
            f"not UTF-8: {exc.reason} at byte {exc.start}", event_type=event_type
        )
    return None


def classify_frame(raw: bytes | str) -> FrameKind:
    """Tell what a frame is without validating its fields; raise if it is none of them."""
    routed = _route(_as_bytes(raw))
    return routed.kind if isinstance(routed, ControlFrame) else routed[0]


def decode_frame(raw: bytes | str) -> TokenPayload | ControlFrame:
    """Decode and validate one frame; raise EventValidationError naming field and reason."""
    data = _as_bytes(raw)
    routed = _route(data)
    if isinstance(routed, ControlFrame):
        return routed
    _, decoder, event_type = routed
    try:
        payload = decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise _not_utf8(data, event_type) or validation_error(exc, event_type=event_type) from None
    except UnicodeDecodeError as exc:  # what msgspec before 0.23 raises for a bad string
        raise EventValidationError(f"not UTF-8: {exc}", event_type=event_type) from None
    _check_values(payload, event_type)
    return payload


def decode_token_frame(raw: bytes | str) -> TokenPayload:
    """Decode a frame that must be a token event (dataset files, stored frames)."""
    payload = decode_frame(raw)
    if isinstance(payload, ControlFrame):
        raise EventValidationError(f"not a token event: {payload.text!r}", field="txType")
    return payload


def frame_kind(payload: TokenPayload | ControlFrame) -> FrameKind:
    """Kind of a decoded frame."""
    if isinstance(payload, ControlFrame):
        return payload.kind
    return KIND_OF_TX_TYPE[payload.txType]


def _decode_control(data: bytes) -> ControlFrame:
    try:
        value = _any_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise _not_utf8(data) or EventValidationError(f"not JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise EventValidationError(f"not UTF-8: {exc}") from None
    if not isinstance(value, dict):
        raise EventValidationError(f"frame is a JSON {type(value).__name__}, expected an object")
    if "txType" in value:
        tx_type = value["txType"]
        if isinstance(tx_type, str):
            # the value is escaped or spaced oddly; rare, so a second parse is fine
            raise _Redispatch(tx_type.encode())
        raise EventValidationError(f"Expected `str`, got {type(tx_type).__name__}", field="txType")
    if "errors" in value:
        if value["errors"] is None:
            raise EventValidationError("errors frame with null `errors`", field="errors")
        message = value.get("message")
        return ControlFrame(
            message=message if isinstance(message, str) else None, errors=value["errors"]
        )
    message = value.get("message")
    if isinstance(message, str):
        return ControlFrame(message=message)
    if "message" in value:
        raise EventValidationError(f"Expected `str`, got {type(message).__name__}", field="message")
    raise EventValidationError("frame has no `txType`, `message` or `errors`", field="txType")


_INF = math.inf


def _check_values(payload: TokenPayload, event_type: str) -> None:
    """Reject values the schema admits but the protocol never sends.

    One chained comparison per frame on the hot path (NaN fails every comparison);
    only a failing frame pays for finding the field to name.
    """
    kind = type(payload)
    if kind is TokenTrade:
        sol = payload.solAmount
        if (
            payload.signature
            and payload.mint
            and payload.traderPublicKey
            and 0 < payload.vSolInBondingCurve < _INF
            and 0 < payload.vTokensInBondingCurve < _INF
            and 0 <= payload.tokenAmount < _INF
            and 0 <= payload.newTokenBalance < _INF
            and (sol is None or 0 <= sol < _INF)
        ):
            return
    elif kind is TokenCreated:
        sol = payload.solAmount
        if (
            payload.signature
            and payload.mint
            and payload.traderPublicKey
            and 0 < payload.vSolInBondingCurve < _INF
            and 0 < payload.vTokensInBondingCurve < _INF
            and 0 <= payload.initialBuy < _INF
            and (sol is None or 0 <= sol < _INF)
        ):
            return
    elif payload.signature and payload.mint:
        return
    _explain_values(payload, event_type)


def _explain_values(payload: TokenPayload, event_type: str) -> None:
    for name in ("signature", "mint", "traderPublicKey"):
        if getattr(payload, name, "x") == "":
            raise EventValidationError("must not be empty", field=name, event_type=event_type)
    for name in ("vSolInBondingCurve", "vTokensInBondingCurve"):
        value = getattr(payload, name, 1)
        if not 0 < value < _INF:
            raise EventValidationError(
                f"must be a positive finite number, got {value!r}",
                field=name,
                event_type=event_type,
            )
    for name in ("initialBuy", "tokenAmount", "newTokenBalance", "solAmount"):
        value = getattr(payload, name, None)
        if value is not None and not 0 <= value < _INF:
            raise EventValidationError(
                f"must be a non-negative finite number, got {value!r}",
                field=name,
                event_type=event_type,
            )


# --------------------------------------------------------------------------------------
# Client messages.

_encoder = msgspec.json.Encoder()


def method_message(method: str, keys: list[str] | tuple[str, ...] | None = None) -> bytes:
    """Encode one client message; keyed methods take at most MAX_KEYS_PER_MESSAGE keys."""
    if method not in METHODS:
        raise ValueError(f"unknown PumpPortal method {method!r}")
    if method in KEYED_METHODS:
        if not keys:
            raise ValueError(f"{method} needs keys")
        if len(keys) > MAX_KEYS_PER_MESSAGE:
            raise ValueError(f"{method}: {len(keys)} keys, at most {MAX_KEYS_PER_MESSAGE}")
        return _encoder.encode({"method": method, "keys": list(keys)})
    return _encoder.encode({"method": method})


def chunk_keys(keys: list[str], size: int = MAX_KEYS_PER_MESSAGE) -> list[list[str]]:
    """Split keys into messages of at most ``size`` keys."""
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def with_api_key(url: str, api_key: str | None) -> str:
    """Append ``api-key`` to the URL's query."""
    if not api_key:
        return url
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}{API_KEY_PARAM}={api_key}"


_KEY_IN_URL = re.compile(rf"({re.escape(API_KEY_PARAM)}=)[^&\s'\"]*")


def redact(text: str, api_key: str | None = None) -> str:
    """Hide the API key in a URL, log line or error message."""
    text = _KEY_IN_URL.sub(r"\1***", text)
    if api_key:
        text = text.replace(api_key, "***")
    return text
