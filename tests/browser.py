"""Open a page in headless Chromium and ask it what it drew, over the DevTools protocol.

Chromium (Debian's ``chromium``) starts on a free local port with a throwaway profile;
:func:`open_page` loads a file, records every request the page makes and evaluates a
script in it. CI sets ``PUMPFLOW_REQUIRE_TOOLS=1`` so a missing browser fails there;
elsewhere a test without one skips and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
#: set by CI: a tool the suite needs that is missing fails the suite
REQUIRE_ENV = "PUMPFLOW_REQUIRE_TOOLS"


def chromium() -> str:
    """The browser's path, or skip (fail where ``PUMPFLOW_REQUIRE_TOOLS=1``)."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    message = f"no headless browser ({', '.join(CANDIDATES)}): apt-get install chromium"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 and {message}", pytrace=False)
    pytest.skip(message)


class Page:
    """One tab, driven over its DevTools WebSocket."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.requests: list[str] = []
        self.events: dict[str, asyncio.Event] = {}

    async def call(self, method: str, **params: Any) -> dict:
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self._note(message)

    def _note(self, message: dict) -> None:
        method = message.get("method", "")
        if method == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])
        self.events.setdefault(method, asyncio.Event()).set()

    async def wait_for(self, method: str) -> None:
        while not self.events.get(method, asyncio.Event()).is_set():
            self._note(json.loads(await self.ws.recv()))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"the page's script failed: {result['exceptionDetails']}")
        return result["result"]["value"]


@contextlib.asynccontextmanager
async def open_page(path: Path, *, width: int = 1280, height: int = 1600):
    """Chromium with ``path`` (absolute) loaded; yields the :class:`Page`."""
    from websockets.asyncio.client import connect

    browser, url = chromium(), path.as_uri()
    # chromium's helper processes outlive the browser's own for a moment and may still
    # write to the profile while it is removed: what they leave is the system's to clean
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc, page_url = await asyncio.wait_for(
            asyncio.to_thread(_start, browser, profile, width, height), 60
        )
        try:
            async with connect(page_url, max_size=None) as ws:
                page = Page(ws)
                await page.call("Network.enable")
                await page.call("Page.enable")
                await page.call("Page.navigate", url=url)
                await asyncio.wait_for(page.wait_for("Page.loadEventFired"), 30)
                yield page
        finally:
            await asyncio.to_thread(_stop, proc)


def _start(browser: str, profile: str, width: int, height: int) -> tuple[subprocess.Popen, str]:
    """The browser on a free port, and the DevTools WebSocket of its tab."""
    proc = subprocess.Popen(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                break
        else:
            raise RuntimeError(f"chromium exited ({proc.wait()}) before it listened")
        # keep reading its log so the browser never blocks on a full pipe
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/json/list", timeout=10) as r:
            targets = json.load(r)
        return proc, next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
