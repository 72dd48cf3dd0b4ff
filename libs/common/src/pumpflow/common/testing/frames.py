"""Hostile PumpPortal frames for fuzzing the frame decoder.

:func:`hostile_frame` builds one frame from real frames given as seeds: mutations of
their bytes and of their fields (values of any JSON type, length or magnitude,
non-base58 and NUL characters, keys repeated, escaped, dropped or added), random JSON
structures, nesting up to 100,000 levels deep, frames of megabytes, raw bytes and text
with lone surrogates. The decoder must answer each with a payload or with its one
validation error, and never raise anything else.

Every choice comes from a :class:`Draws` source, so the same frames come from
hypothesis in the tests (:class:`HypothesisDraws`) and from a coverage-guided fuzzer's
bytes in the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

_encode = msgspec.json.encode

#: characters that probe the key alphabet and the store: base58, its four missing
#: letters, NUL and other controls, a quote, a backslash and non-ASCII
PROBE_CHARS = '19AHJNPZakmz0OIl\x00\x01\x1f"\\ é€😀'
_SPECIAL_NUMBERS = (0, -5, 1e308, -1e308, 1e-300, 5e-324, 30.0, 1.073e9, 2**63, 2**64, 10**400)
_MAX_DEPTH = 100_000
_MAX_HUGE = 2 * 1024 * 1024


class Draws(Protocol):
    """Where a frame's choices come from."""

    def integer(self, low: int, high: int) -> int: ...

    def number(self) -> int | float: ...

    def text(self, max_size: int, alphabet: str | None = None) -> str:
        """Any text (lone surrogates included) when ``alphabet`` is None."""
        ...

    def binary(self, max_size: int) -> bytes: ...


def _pick(draws: Draws, items: Sequence[Any]) -> Any:
    return items[draws.integer(0, len(items) - 1)]


def _json_value(draws: Draws, depth: int = 0) -> Any:
    kind = draws.integer(0, 6 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return draws.integer(0, 1) == 1
    if kind == 2:
        return draws.number() if draws.integer(0, 1) else _pick(draws, _SPECIAL_NUMBERS)
    if kind == 3:
        return _utf8(draws.text(40))
    if kind == 4:
        return draws.text(90, PROBE_CHARS)
    if kind == 5:
        return [_json_value(draws, depth + 1) for _ in range(draws.integer(0, 4))]
    return {
        _utf8(draws.text(12)): _json_value(draws, depth + 1) for _ in range(draws.integer(0, 4))
    }


def _utf8(text: str) -> str:
    """``text`` without lone surrogates, which no JSON encoder writes."""
    return text.encode(errors="replace").decode()


def _field_mutation(draws: Draws, seeds: Sequence[bytes]) -> bytes:
    frame = msgspec.json.decode(_pick(draws, seeds))
    keys = sorted(frame)
    for _ in range(draws.integer(1, 3)):
        key = _pick(draws, keys)
        how = draws.integer(0, 4)
        if how == 0:
            frame[key] = _json_value(draws)
        elif how == 1:
            # a near miss: the real value with probe characters in or around it
            value = str(frame.get(key, ""))
            at = draws.integer(0, len(value))
            frame[key] = value[:at] + draws.text(4, PROBE_CHARS) + value[at:]
        elif how == 2:
            frame[key] = _pick(draws, "5z1a") * draws.integer(45, 300_000)
        elif how == 3:
            frame.pop(key, None)
        else:
            frame[_utf8(draws.text(12))] = _json_value(draws)
    text = _encode(frame).decode()
    if draws.integer(0, 1) and keys:
        # a key given twice, raw or escaped, before or after the real one
        key = _pick(draws, keys)
        name = key if draws.integer(0, 1) else "".join(f"\\u{ord(c):04x}" for c in key)
        member = f'"{name}":{_encode(_json_value(draws)).decode()}'
        text = f"{{{member},{text[1:]}" if draws.integer(0, 1) else f"{text[:-1]},{member}}}"
    return text.encode()


def _byte_mutation(draws: Draws, seeds: Sequence[bytes]) -> bytes:
    data = bytearray(_pick(draws, seeds))
    for _ in range(draws.integer(1, 4)):
        at = draws.integer(0, len(data))
        how = draws.integer(0, 3)
        if how == 0:
            data[at:at] = draws.binary(8) or b"\x00"
        elif how == 1:
            del data[at : at + draws.integer(1, 8)]
        elif how == 2:
            data[at : at + 1] = bytes([draws.integer(0, 255)])
        else:
            del data[at:]
    return bytes(data)


def _deep(draws: Draws, seeds: Sequence[bytes]) -> bytes:
    depth = _MAX_DEPTH - draws.integer(0, _MAX_DEPTH - 1)  # the deepest first
    opening, closing = _pick(draws, ((b"[", b"]"), (b'{"a":', b"}")))
    nested = opening * depth + b"1" + closing * depth
    if draws.integer(0, 1):
        return nested
    name = _pick(draws, (b"x", b"mint", b"message", b"errors"))
    return _pick(draws, seeds)[:-1] + b', "' + name + b'": ' + nested + b"}"


def _oversized(draws: Draws, seeds: Sequence[bytes]) -> bytes:
    size = _MAX_HUGE - draws.integer(0, _MAX_HUGE - 1_000)  # the largest first
    return _pick(draws, seeds)[:-1] + b', "pad": "' + b"x" * size + b'"}'


def _structure(draws: Draws, seeds: Sequence[bytes]) -> bytes:
    return _encode(_json_value(draws))


def _raw(draws: Draws, seeds: Sequence[bytes]) -> bytes | str:
    return draws.binary(64) if draws.integer(0, 1) else draws.text(64)


#: what :func:`hostile_frame` draws, and its label in a fuzzer's tally
KINDS = {
    "field mutation": _field_mutation,
    "byte mutation": _byte_mutation,
    "random structure": _structure,
    "deep nesting": _deep,
    "oversized": _oversized,
    "raw bytes or text": _raw,
}
_BUILDERS = tuple(KINDS.values())
_LABELS = tuple(KINDS)


def hostile_frame(draws: Draws, seeds: Sequence[bytes]) -> tuple[str, bytes | str]:
    """Return ``(kind, frame)``: one frame a hostile or broken peer could send."""
    index = draws.integer(0, len(_BUILDERS) - 1)
    return _LABELS[index], _BUILDERS[index](draws, seeds)


class HypothesisDraws:
    """Draws from hypothesis's ``st.data()`` (needs hypothesis, a test dependency)."""

    def __init__(self, data: Any):
        from hypothesis import strategies as st

        self._data = data
        self._st = st

    def integer(self, low: int, high: int) -> int:
        return self._data.draw(self._st.integers(low, high))

    def number(self) -> int | float:
        st = self._st
        return self._data.draw(st.integers() | st.floats(allow_nan=False, allow_infinity=False))

    def text(self, max_size: int, alphabet: str | None = None) -> str:
        st = self._st
        chars = st.characters(blacklist_categories=()) if alphabet is None else alphabet
        return self._data.draw(st.text(chars, max_size=max_size))

    def binary(self, max_size: int) -> bytes:
        return self._data.draw(self._st.binary(max_size=max_size))
