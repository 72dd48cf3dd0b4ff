"""Calls of the CLI to a running service's HTTP API (the token guards what changes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 10.0


def http_url(text: str) -> str:
    """A ``--url`` of a service's HTTP API, without its trailing slash; anything but an
    http(s) address with a host is refused as the flag's error."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text.rstrip("/")


def api_token(command: str) -> str | None:
    """``PUMPFLOW_API_TOKEN``, or None after saying it is missing."""
    token = os.environ.get("PUMPFLOW_API_TOKEN")
    if not token:
        print(f"pumpflow {command}: PUMPFLOW_API_TOKEN is not set", file=sys.stderr)
    return token


def get_json(url: str) -> dict:
    """GET ``url``'s JSON body (raises urllib.error.HTTPError, OSError)."""
    with urllib.request.urlopen(urllib.request.Request(url), timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, token: str) -> dict:
    """POST ``body`` as JSON with the bearer ``token``; the answer's JSON body."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())
