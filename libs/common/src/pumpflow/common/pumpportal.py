"""PumpPortal's real-time WebSocket protocol: constants and frame decoding.

Shared by the feed (live frames) and the simulator (server side, dataset loader).
Token frames decode straight into the v1 payloads of :mod:`pumpflow.common.events`
with PumpPortal's field names and JSON types; control frames (``{"message": ...}``)
and error frames (``{"errors": ...}``) decode into :class:`ControlFrame`.

Every field of a token frame has a bound the protocol justifies (lengths and alphabets
of keys and signatures, the curve's physical ranges and invariants), a field named
twice makes the frame ambiguous, and any frame that fails is rejected with one
EventValidationError naming the field: nothing else escapes the decoder.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Final, Literal, get_origin

import msgspec

from pumpflow.common import curve
from pumpflow.common.events import (
    EventValidationError,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    validation_error,
)

DEFAULT_WS_URL: Final = "wss://pumpportal.fun/api/data"
#: the trade API that signs and sends from the key's wallet (1% fee)
TRADE_API_URL: Final = "https://pumpportal.fun/api/trade"
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
# Bounds of a frame's fields, as the protocol justifies them.

#: A data frame with every field at its bound and every character escaped is under
#: 4 KiB; acknowledgements are under 200 bytes. The margin is for an error frame that
#: names every key of a subscription (5,000 keys of 44 characters, about 235 KB).
MAX_FRAME_BYTES: Final = 256 * 1024

_BASE58 = "[1-9A-HJ-NP-Za-km-z]"
#: a public key (mint, wallet, bonding curve) is 32 bytes: 32 to 44 base58 characters
_PUBKEY = re.compile(_BASE58 + "{32,44}")
#: a transaction signature is 64 bytes: 64 to 88 base58 characters (about 1 in 5 real
#: signatures has 87, and about 1 in 18,000 has 86)
_SIGNATURE = re.compile(_BASE58 + "{64,88}")
#: a create or trade frame's signature, mint, trader and curve, joined by spaces (one
#: match instead of four on the hot path)
_TRADER_KEYS = re.compile(" ".join([_SIGNATURE.pattern] + [_PUBKEY.pattern] * 3))
#: pool names are short lowercase identifiers: pump, pump-amm; the trade API's pool
#: parameter also names raydium, raydium-cpmm, launchlab, bonk, auto
_POOL = re.compile("[a-z0-9-]{1,32}")
#: the Pump program's create instruction takes a name of at most 32 characters, a
#: symbol of at most 13 (10 under the Metaplex metadata of older coins) and a uri of
#: at most 200; the program counts bytes, so a character bound is never tighter
MAX_NAME_CHARS: Final = 32
MAX_SYMBOL_CHARS: Final = 13
MAX_URI_CHARS: Final = 200

#: The curve's fields must satisfy its invariants to within this relative mismatch:
#: far above the rounding of lamports and token base units (below 1e-9), far below a
#: mismatch that would move a price anyone trades on.
CURVE_TOLERANCE: Final = 1e-3
_LOW = 1.0 - CURVE_TOLERANCE
_HIGH = 1.0 + CURVE_TOLERANCE
#: virtual token reserves: from the completed curve up to the initial reserves plus a
#: mayhem agent's second billion; virtual SOL reserves follow from the constant product
_MIN_V_TOKENS = curve.COMPLETE_VIRTUAL_TOKEN_RESERVES * _LOW
_MAX_V_TOKENS = curve.MAX_VIRTUAL_TOKEN_RESERVES * _HIGH
_MIN_V_SOL = curve.MIN_VIRTUAL_SOL_RESERVES * _LOW
_MAX_V_SOL = curve.COMPLETE_VIRTUAL_SOL_RESERVES * _HIGH
#: no trade, balance or creator buy holds more tokens than exist (mayhem supply included);
#: a creator buy takes at most the sellable reserves of a fresh curve
_MAX_TOKENS = curve.MAX_TOKEN_SUPPLY * _HIGH
_MAX_INITIAL_BUY = curve.INITIAL_REAL_TOKEN_RESERVES * _HIGH
#: one trade moves at most the SOL the whole curve holds, fee included
_MAX_TRADE_SOL = curve.COMPLETE_VIRTUAL_SOL_RESERVES * (1.0 + curve.FEE_RATE) * _HIGH


# --------------------------------------------------------------------------------------
# Decoding.


class _Head(msgspec.Struct):
    """The field that routes a frame, read by msgspec as the payload decoders read it."""

    txType: Any = msgspec.UNSET


_head_decoder = msgspec.json.Decoder(_Head)
_created_decoder = msgspec.json.Decoder(TokenCreated)
_trade_decoder = msgspec.json.Decoder(TokenTrade)
_migrated_decoder = msgspec.json.Decoder(TokenMigrated)
_any_decoder = msgspec.json.Decoder()

_BY_TX_TYPE: Final = {
    "create": (FrameKind.CREATE, _created_decoder, TokenCreated.TYPE),
    "buy": (FrameKind.BUY, _trade_decoder, TokenTrade.TYPE),
    "sell": (FrameKind.SELL, _trade_decoder, TokenTrade.TYPE),
    "migrate": (FrameKind.MIGRATE, _migrated_decoder, TokenMigrated.TYPE),
}
#: frame kind of each token payload's txType
KIND_OF_TX_TYPE: Final = {k: v[0] for k, v in _BY_TX_TYPE.items()}


def _as_bytes(raw: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode()
    return bytes(raw)


def _route(data: bytes):
    """Return a control frame, decoded, or the registry entry of the frame's txType."""
    if len(data) > MAX_FRAME_BYTES:
        raise EventValidationError(
            f"frame of {len(data):,} bytes over the limit of {MAX_FRAME_BYTES:,}"
        )
    if not data.isascii():
        # checked here, not by msgspec: frames are stored as text, so the fields the
        # decoders skip must be UTF-8 too, and the reason stays ours across releases
        try:
            data.decode()
        except UnicodeDecodeError as exc:
            raise EventValidationError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        tx_type = _head_decoder.decode(data).txType
    except msgspec.ValidationError:
        raise _not_an_object(data) from None
    except msgspec.MsgspecError as exc:
        raise EventValidationError(f"not JSON: {exc}") from None
    if tx_type is msgspec.UNSET:
        return _decode_control(data)
    if type(tx_type) is not str:
        raise EventValidationError(f"Expected `str`, got {type(tx_type).__name__}", field="txType")
    entry = _BY_TX_TYPE.get(tx_type)
    if entry is None:
        raise EventValidationError(f"unknown txType {tx_type[:40]!r}", field="txType")
    return entry


def _not_an_object(data: bytes) -> EventValidationError:
    """The error of a frame that is valid JSON but not an object, or of one that is not JSON."""
    try:
        value = _any_decoder.decode(data)
    except msgspec.MsgspecError as exc:  # the head rejected its type before its end
        return EventValidationError(f"not JSON: {exc}")
    return EventValidationError(f"frame is a JSON {type(value).__name__}, expected an object")


def _frame_error(exc: Exception, event_type: str | None = None) -> EventValidationError:
    """The frame's own error for anything decoding it raised that is not a validation error."""
    if isinstance(exc, RecursionError):
        return EventValidationError("nested too deep to decode", event_type=event_type)
    if isinstance(exc, UnicodeError):  # a str frame with a lone surrogate
        return EventValidationError(f"not UTF-8: {exc}", event_type=event_type)
    return EventValidationError(
        f"could not decode: {type(exc).__name__}: {str(exc)[:200]}", event_type=event_type
    )


def classify_frame(raw: bytes | str) -> FrameKind:
    """Tell what a frame is without validating its fields; raise if it is none of them."""
    try:
        routed = _route(_as_bytes(raw))
    except EventValidationError:
        raise
    except Exception as exc:
        raise _frame_error(exc) from None
    return routed.kind if isinstance(routed, ControlFrame) else routed[0]


def decode_frame(raw: bytes | str) -> TokenPayload | ControlFrame:
    """Decode and validate one frame; raise EventValidationError naming field and reason.

    Whatever a frame holds, the only exception is EventValidationError: a frame nested
    too deep, too large or otherwise undecodable is that frame's error.
    """
    try:
        data = _as_bytes(raw)
        if len(data) <= MAX_FRAME_BYTES and data.isascii():
            # most frames are trades: one parse straight into the trade, and only a
            # frame it does not fit pays for routing (the errors are the route's)
            try:
                payload = _trade_decoder.decode(data)
            except msgspec.MsgspecError:
                pass
            else:
                _check_keys_unique(data, _quotes_needed(payload), TokenTrade.TYPE)
                _check_values(payload, TokenTrade.TYPE)
                return payload
        routed = _route(data)
        if isinstance(routed, ControlFrame):
            return routed
        _, decoder, event_type = routed
        try:
            payload = decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise validation_error(exc, event_type=event_type) from None
        _check_keys_unique(data, _quotes_needed(payload), event_type)
        _check_values(payload, event_type)
        return payload
    except EventValidationError:
        raise
    except Exception as exc:
        raise _frame_error(exc) from None


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
        raise EventValidationError(f"not JSON: {exc}") from None
    _check_keys_unique(data, _quotes_of(value), None)
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


def _check_keys_unique(data: bytes, quotes_needed: int, event_type: str | None) -> None:
    """Reject a frame that names a key twice: its readers could disagree on the value.

    Hot path: every string has its two quotes and an escaped quote inside one adds a
    third, so a frame has at least two quotes per key and two per string value.
    ``quotes_needed`` counts them for each key given once; a repeated key adds two, so a
    frame with no more than that names none twice, escapes or not. A frame with more
    (keys the payload does not know) is counted again from its top-level object if no
    backslash can hide a quote in a string, and anything else gets a full parse.
    """
    quotes = data.count(b'"')
    if quotes == quotes_needed:
        return
    if b"\\" not in data and quotes == _quotes_of(_any_decoder.decode(data)):
        return
    duplicated = _duplicated_key(data)
    if duplicated is not None:
        raise EventValidationError(
            "key given more than once: the frame is ambiguous",
            field=duplicated[:40],
            event_type=event_type,
        )


def _quotes_of(value: dict[str, Any]) -> int:
    """Quotes of a flat object with each key once; -1 if a value is an object or array."""
    quotes = 2 * len(value)
    for item in value.values():
        kind = type(item)
        if kind is str:
            quotes += 2
        elif kind is dict or kind is list:
            return -1
    return quotes


def _quotes_needed(payload: TokenPayload) -> int:
    """Quotes of the frame of ``payload`` with each key once (see _check_keys_unique)."""
    quotes, optional = _FIELD_QUOTES[type(payload)]
    for name, field_quotes in optional:
        if getattr(payload, name) is not None:
            quotes += field_quotes
    return quotes


def _field_quotes(schema: type[msgspec.Struct]) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Quotes of a schema's required fields, and of each optional one (None when left out)."""
    required = 0
    optional = []
    for field in msgspec.structs.fields(schema):
        text = field.type is str or field.type == str | None or get_origin(field.type) is Literal
        quotes = 4 if text else 2
        if field.required:
            required += quotes
        else:
            optional.append((field.name, quotes))
    return required, tuple(optional)


_FIELD_QUOTES: Final = {
    schema: _field_quotes(schema) for schema in (TokenCreated, TokenTrade, TokenMigrated)
}


def _duplicated_key(data: bytes) -> str | None:
    """The first key that an object of the frame repeats, or None (a full parse)."""
    repeated: list[str] = []

    def object_pairs(pairs: list[tuple[str, Any]]) -> None:
        if not repeated and len({key for key, _ in pairs}) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    repeated.append(key)
                    break
                seen.add(key)

    ignore = _ignore_value
    json.loads(data, object_pairs_hook=object_pairs, parse_float=ignore, parse_int=ignore,
               parse_constant=ignore)  # fmt: skip
    return repeated[0] if repeated else None


def _ignore_value(_text: str) -> None:
    return None


def _check_values(payload: TokenPayload, event_type: str) -> None:
    """Reject values the schema admits but the protocol never sends.

    One chained test per frame on the hot path (NaN fails every comparison, and an
    integer too large for a float fails the bounds before any arithmetic); only a
    failing frame pays for finding the field to name.
    """
    kind = type(payload)
    if kind is TokenTrade:
        v_sol = payload.vSolInBondingCurve
        v_tokens = payload.vTokensInBondingCurve
        sol = payload.solAmount
        pool = payload.pool
        if (
            _TRADER_KEYS.fullmatch(
                f"{payload.signature} {payload.mint} {payload.traderPublicKey} "
                f"{payload.bondingCurveKey}"
            )
            and _MIN_V_SOL <= v_sol <= _MAX_V_SOL
            and _MIN_V_TOKENS <= v_tokens <= _MAX_V_TOKENS
            and 0 <= payload.tokenAmount <= _MAX_TOKENS
            and 0 <= payload.newTokenBalance <= _MAX_TOKENS
            and (sol is None or 0 <= sol <= _MAX_TRADE_SOL)
            and (pool is None or pool == POOL_PUMP or _POOL.fullmatch(pool))
            and curve.frame_consistency_error(v_sol, v_tokens, payload.marketCapSol)
            <= CURVE_TOLERANCE
        ):
            return
    elif kind is TokenCreated:
        v_sol = payload.vSolInBondingCurve
        v_tokens = payload.vTokensInBondingCurve
        sol = payload.solAmount
        pool = payload.pool
        if (
            _TRADER_KEYS.fullmatch(
                f"{payload.signature} {payload.mint} {payload.traderPublicKey} "
                f"{payload.bondingCurveKey}"
            )
            and _MIN_V_SOL <= v_sol <= _MAX_V_SOL
            and _MIN_V_TOKENS <= v_tokens <= _MAX_V_TOKENS
            and 0 <= payload.initialBuy <= _MAX_INITIAL_BUY
            and (sol is None or 0 <= sol <= _MAX_TRADE_SOL)
            and len(payload.name) <= MAX_NAME_CHARS
            and len(payload.symbol) <= MAX_SYMBOL_CHARS
            and len(payload.uri) <= MAX_URI_CHARS
            and (pool is None or pool == POOL_PUMP or _POOL.fullmatch(pool))
            and curve.frame_consistency_error(v_sol, v_tokens, payload.marketCapSol)
            <= CURVE_TOLERANCE
        ):
            return
    elif (
        _SIGNATURE.fullmatch(payload.signature)
        and _PUBKEY.fullmatch(payload.mint)
        and (payload.pool is None or _POOL.fullmatch(payload.pool))
    ):
        return
    raise _explain_values(payload, event_type)


def is_public_key(text: str) -> bool:
    """Whether ``text`` has a public key's form (a mint's, a wallet's)."""
    return _PUBKEY.fullmatch(text) is not None


def has_signature_form(text: str) -> bool:
    """Whether ``text`` has the form of 64 bytes in base58: a signature's, or a
    keypair's (the private key with the public one)."""
    return _SIGNATURE.fullmatch(text) is not None


_PUBKEY_TEXT = "a public key: 32 to 44 base58 characters"
_TEXT_BOUNDS: Final = (
    ("signature", _SIGNATURE, "a signature: 64 to 88 base58 characters"),
    ("mint", _PUBKEY, _PUBKEY_TEXT),
    ("traderPublicKey", _PUBKEY, _PUBKEY_TEXT),
    ("bondingCurveKey", _PUBKEY, _PUBKEY_TEXT),
    ("pool", _POOL, "a pool name: 1 to 32 of a-z, 0-9 and -"),
)
_LENGTH_BOUNDS: Final = (("name", MAX_NAME_CHARS), ("symbol", MAX_SYMBOL_CHARS),
                         ("uri", MAX_URI_CHARS))  # fmt: skip
_NUMBER_BOUNDS: Final = (
    ("vSolInBondingCurve", _MIN_V_SOL, _MAX_V_SOL),
    ("vTokensInBondingCurve", _MIN_V_TOKENS, _MAX_V_TOKENS),
    ("initialBuy", 0, _MAX_INITIAL_BUY),
    ("tokenAmount", 0, _MAX_TOKENS),
    ("newTokenBalance", 0, _MAX_TOKENS),
    ("solAmount", 0, _MAX_TRADE_SOL),
)


def _explain_values(payload: TokenPayload, event_type: str) -> EventValidationError:
    """The error of the first field of ``payload`` out of its bounds."""

    def error(field: str, reason: str) -> EventValidationError:
        return EventValidationError(reason, field=field, event_type=event_type)

    for field, pattern, what in _TEXT_BOUNDS:
        value = getattr(payload, field, None)
        if value is None or pattern.fullmatch(value):
            continue
        if value == "":
            return error(field, "must not be empty")
        return error(field, f"must be {what}, got {len(value):,} characters: {value[:24]!r}")
    for field, limit in _LENGTH_BOUNDS:
        value = getattr(payload, field, None)
        if value is not None and len(value) > limit:
            return error(field, f"must be at most {limit} characters, got {len(value):,}")
    for field, low, high in _NUMBER_BOUNDS:
        value = getattr(payload, field, None)
        if value is not None and not low <= value <= high:
            return error(field, f"must be within [{low:.6g}, {high:.6g}], got {_number(value)}")
    v_sol = payload.vSolInBondingCurve
    v_tokens = payload.vTokensInBondingCurve
    mismatch = curve.reserves_error(v_sol, v_tokens)
    if mismatch > CURVE_TOLERANCE:
        return error(
            "vTokensInBondingCurve",
            f"reserves of {_number(v_sol)} SOL and {_number(v_tokens)} tokens are off the "
            f"constant product by {mismatch:.3g} (at most {CURVE_TOLERANCE:g})",
        )
    market_cap = payload.marketCapSol
    mismatch = curve.market_cap_error(v_sol, v_tokens, market_cap)
    return error(
        "marketCapSol",
        f"{_number(market_cap)} is off the reserves' price by {mismatch:.3g} "
        f"(at most {CURVE_TOLERANCE:g})",
    )


def _number(value: float) -> str:
    """A number for an error message, however many digits it was sent with."""
    text = repr(value)
    return text if len(text) <= 32 else f"{text[:16]}...({len(text):,} digits)"


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
