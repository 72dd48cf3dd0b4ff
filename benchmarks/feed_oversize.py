"""Frames over the feed's read limit: one connection, bounded memory, prefixes dead-lettered.

A WebSocket server in a process of its own sends ``--frames`` frames of ``--mib`` MiB
each (over the feed's 4 MiB read limit, within the socket library's 8 MiB), then a
control frame that ends the run, to a SocketDataFeed whose dead letters go to a sink
that counts them. Printed: sessions (1: the connection went on), frames refused,
dead-letter bytes, the feed process's peak resident memory before and after, wall and
CPU seconds (time.process_time, the feed's process only) and the load average.

Run: .venv/bin/python benchmarks/feed_oversize.py [--frames N] [--mib M]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time

from pumpflow.common.clock import WallClock
from pumpflow.feed.socket_feed import SocketDataFeed, SocketFeedConfig

#: the control frame that ends the run, and its text as the feed keeps it
DONE, DONE_TEXT = '{"message": "oversize run done"}', "oversize run done"


async def serve(frames: int, size: int) -> None:
    """Send ``frames`` frames of ``size`` bytes once the feed subscribes, then DONE."""
    from websockets.asyncio.server import serve as ws_serve

    frame = '{"message": "' + "m" * size + '"}'

    async def handler(ws) -> None:
        async for message in ws:
            if "subscribeNewToken" in message:
                for _ in range(frames):
                    await ws.send(frame)
                await ws.send(DONE)

    async with ws_serve(handler, "127.0.0.1", 0, max_queue=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


class CountingSink:
    """Takes dead letters at once and counts them."""

    def __init__(self) -> None:
        self.letters = 0
        self.bytes = 0

    async def dead_letter(self, body: bytes, **_) -> None:
        self.letters += 1
        self.bytes += len(body)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(frames: int, size: int) -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", "--frames", str(frames), "--bytes", str(size),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        port = int(await server.stdout.readline())
        sink = CountingSink()
        config = SocketFeedConfig(url=f"ws://127.0.0.1:{port}/", subscribe_migrations=False,
                                  auto_subscribe_trades=False)  # fmt: skip
        feed = SocketDataFeed(config, clock=WallClock(), bus=sink)
        before = peak_rss_mib()
        wall, cpu = time.perf_counter(), time.process_time()
        await feed.connect()
        # the feed signals no control frame: its notices are polled
        while DONE_TEXT not in feed.notices:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await feed.dead_letters.flush()
        await feed.disconnect()
    finally:
        server.kill()
        await server.wait()
    print(f"{frames} frames of {size / 2**20:.1f} MiB ({frames * size / 2**20:,.0f} MiB): "
          f"{feed.sessions} session(s), {feed.invalid_frames} refused, {sink.letters} dead "
          f"letters of {sink.bytes / 2**10:,.0f} KiB")  # fmt: skip
    print(
        f"peak RSS {before:.0f} MiB before, {peak_rss_mib():.0f} MiB after; "
        f"{wall:.2f} s wall, {cpu:.2f} s CPU; load average {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--mib", type=float, default=5.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.frames, args.bytes))
    else:
        asyncio.run(measure(args.frames, int(args.mib * 2**20)))


if __name__ == "__main__":
    main()
