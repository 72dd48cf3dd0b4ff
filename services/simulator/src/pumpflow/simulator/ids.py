"""Realistic, seeded identifiers: base58 signatures, wallets and mints, token names, uris.

Strings are drawn character by character from the base58 alphabet rather than encoded
from random bytes (encoding costs microseconds a frame). The leading character is
restricted so that every string still decodes to exactly 64 bytes (signatures, 88
characters) or 32 bytes (wallets and mints, 44 characters), as real keys do.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
SIGNATURE_LENGTH = 88
KEY_LENGTH = 44
MINT_SUFFIX = "pump"

# 232 = 4 x 58: bytes above it are dropped so every character is equally likely.
_BYTE_TO_BASE58 = bytes.maketrans(
    bytes(range(232)), bytes(BASE58_ALPHABET.encode()[i % 58] for i in range(232))
)
_DROPPED_BYTES = bytes(range(232, 256))
# 58^87 <= value < 2^512 needs a leading digit of 1..5; 58^43 <= value < 2^256 needs 1..17.
_SIGNATURE_LEAD = {c: "2345"[i % 4] for i, c in enumerate(BASE58_ALPHABET)}
_KEY_LEAD = {c: BASE58_ALPHABET[1 + i % 16] for i, c in enumerate(BASE58_ALPHABET)}
_CHUNK = 1 << 17
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"

_WORDS = (
    "Cash Elon Doge Pepe Moon Cat Frog Based Chad Giga Baby Mini Super Turbo Pump Degen "
    "Wojak Shiba Inu Bonk Trump Sol Rocket Alpha Sigma Meme Coin King Queen Lord Dog "
    "Penguin Hamster Banana Pizza Taco Ape Bull Bear Diamond Hands Laser Eyes Ninja "
    "Wizard Goblin Dragon Unicorn Rizz Skibidi Chill Guy Retard Hawk Tuah Grok AI Agent "
    "Neko Kawaii Boba Moo Deng Hippo Fartcoin Goat Pnut Squirrel Gorilla Monkey Zoo "
    "Meta Quantum Cyber Neon Pixel Retro Vibe Wagmi Ngmi Ser Fren Anon Whale Shrimp"
).split()


class IdFactory:
    """Draw identifiers from one seeded :class:`random.Random`."""

    __slots__ = ("_buf", "_pos", "_rng")

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._buf = ""
        self._pos = 0

    def _chars(self, n: int) -> str:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            fresh = self._rng.randbytes(_CHUNK).translate(_BYTE_TO_BASE58, _DROPPED_BYTES)
            self._buf = self._buf[pos:] + fresh.decode("ascii")
            pos, end = 0, n
        self._pos = end
        return self._buf[pos:end]

    def signature(self) -> str:
        """An 88-character transaction signature."""
        s = self._chars(SIGNATURE_LENGTH)
        return _SIGNATURE_LEAD[s[0]] + s[1:]

    def signatures(self, batch: int = 1024) -> Iterator[str]:
        """An endless stream of signatures, drawn in batches (the frame hot path uses it)."""
        lead = _SIGNATURE_LEAD
        n = SIGNATURE_LENGTH
        while True:
            block = self._chars(n * batch)
            yield from [lead[block[i]] + block[i + 1 : i + n] for i in range(0, n * batch, n)]

    def key(self) -> str:
        """A 44-character public key (wallet, bonding-curve account)."""
        s = self._chars(KEY_LENGTH)
        return _KEY_LEAD[s[0]] + s[1:]

    def mint(self) -> str:
        """A 44-character vanity mint address ending in ``pump``."""
        s = self._chars(KEY_LENGTH - len(MINT_SUFFIX))
        return _KEY_LEAD[s[0]] + s[1:] + MINT_SUFFIX

    def name_and_symbol(self) -> tuple[str, str]:
        """A meme-coin name (sometimes with trailing spaces, as seen live) and its ticker."""
        rng = self._rng
        words = rng.sample(_WORDS, rng.choice((1, 1, 2, 2, 2, 3)))
        name = " ".join(words)
        if rng.random() < 0.3:
            name = name.upper() if rng.random() < 0.5 else name.lower()
        if rng.random() < 0.12:
            name += " " * rng.choice((1, 1, 1, 2))
        symbol = "".join(w for w in words).upper()[: rng.choice((4, 5, 6, 8, 10))]
        return name, symbol

    def uri(self) -> str:
        """A metadata uri: mostly an IPFS CIDv1 on ipfs.io, sometimes a CIDv0 gateway link."""
        rng = self._rng
        if rng.random() < 0.85:
            cid = "bafkrei" + "".join(rng.choices(_BASE32, k=52))
            return "https://ipfs.io/ipfs/" + cid
        return "https://cf-ipfs.com/ipfs/Qm" + self._chars(44)
