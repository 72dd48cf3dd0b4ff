"""Fuzz the frame decoder: a million hostile frames, none may raise but its validation error.

A coverage-guided fuzzer (atheris, over libFuzzer) feeds bytes to
:func:`pumpflow.common.testing.frames.hostile_frame`, which turns them into frames near
the real ones of the protocol reference: mutated bytes and fields, random JSON, nesting
up to 100,000 levels, frames of megabytes, raw bytes and text. Each frame goes through
``decode_frame``; a payload or an EventValidationError is the only acceptable outcome.
The decoder's own code is instrumented, so inputs that reach new branches are kept and
mutated further. Prints how many frames were tried, how each kind ended, and how many
escaped as another exception (the run fails if any did).

Run: .venv/bin/python benchmarks/fuzz_decoder.py [--runs 1000000] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback

import atheris

with atheris.instrument_imports(include=["pumpflow.common.pumpportal"]):
    from pumpflow.common.pumpportal import ControlFrame, decode_frame

from pumpflow.common.events import EventValidationError
from pumpflow.common.testing.frames import hostile_frame
from pumpflow.feed import reference_frames as ref

SEEDS = (
    ref.CREATE, ref.SELL, ref.OLD_BUY, ref.MIGRATE, ref.ACK_NEW_TOKEN, ref.ACK_KEYS,
    ref.API_KEY_MESSAGE, ref.ERROR_STRING, ref.ERROR_LIST,
)  # fmt: skip


class FuzzerDraws:
    """Draws from the fuzzer's bytes (zeros once they run out)."""

    def __init__(self, data: bytes):
        self._fdp = atheris.FuzzedDataProvider(data)

    def integer(self, low: int, high: int) -> int:
        return self._fdp.ConsumeIntInRange(low, high)

    def number(self) -> int | float:
        fdp = self._fdp
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeInt(9)

    def text(self, max_size: int, alphabet: str | None = None) -> str:
        fdp = self._fdp
        size = fdp.ConsumeIntInRange(0, max_size)
        if alphabet is None:
            return fdp.ConsumeUnicode(size)  # lone surrogates included
        last = len(alphabet) - 1
        return "".join(alphabet[fdp.ConsumeIntInRange(0, last)] for _ in range(size))

    def binary(self, max_size: int) -> bytes:
        return self._fdp.ConsumeBytes(self._fdp.ConsumeIntInRange(0, max_size))


class Tally:
    def __init__(self, runs: int):
        self.runs = runs
        self.tried = 0
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.escaped: list[str] = []
        self.started = time.perf_counter()

    def report(self) -> None:
        took = time.perf_counter() - self.started
        print(f"fuzz_decoder: {self.tried:,} frames tried in {took:.0f} s "
              f"({self.tried / took:,.0f}/s); {len(self.escaped):,} escaped as an "
              f"unexpected exception")  # fmt: skip
        kinds = sorted({kind for kind, _ in self.outcomes})
        for kind in kinds:
            ends = {end: n for (k, end), n in self.outcomes.items() if k == kind}
            total = sum(ends.values())
            detail = ", ".join(f"{end} {n:,}" for end, n in sorted(ends.items()))
            print(f"  {kind}: {total:,} ({detail})")
        for text in self.escaped[:5]:
            print(text)
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tally = Tally(args.runs)

    def one_input(data: bytes) -> None:
        kind, frame = hostile_frame(FuzzerDraws(data), SEEDS)
        try:
            payload = decode_frame(frame)
        except EventValidationError:
            end = "rejected"
        except Exception:
            end = "ESCAPED"
            tally.escaped.append(f"{frame[:200]!r}\n{traceback.format_exc()}")
        else:
            end = "control" if type(payload) is ControlFrame else "accepted"
        tally.outcomes[kind, end] += 1
        tally.tried += 1
        if tally.tried == tally.runs:
            tally.report()
            # libFuzzer ends the process itself; say how it should end first
            os._exit(1 if tally.escaped else 0)

    # inputs up to 4 KiB drive the draws; sizes of megabytes come from the draws
    atheris.Setup([sys.argv[0], f"-seed={args.seed}", "-max_len=4096", "-print_final_stats=0",
                   "-rss_limit_mb=4096"], one_input)  # fmt: skip
    atheris.Fuzz()


if __name__ == "__main__":
    main()
