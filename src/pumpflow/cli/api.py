"""Calls of the CLI to a running service's HTTP API (the token guards what changes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 10.0
#: the variable the CLI reads the bearer token from, and the services theirs
TOKEN_VARIABLE = "PUMPFLOW_API_TOKEN"
#: the variables the CLI reads a replica's ``--url`` from, by service
URL_VARIABLES = {
    "exit": "PUMPFLOW_EXIT_URL",
    "model": "PUMPFLOW_MODEL_URL",
    "trading": "PUMPFLOW_TRADING_URL",
}
#: what the CLI calls a replica of each service it talks to
REPLICAS = {"exit": "an exit replica", "model": "a model replica", "trading": "a trading replica"}
#: the longest answer of a service quoted in an error line
QUOTED_MAX_CHARS = 300
#: exit status of every control command whose request the service accepted and has not
#: published yet: the broker takes no publication now (short of memory or disk, or not
#: answering); the service publishes it once the broker does, so asking again would send
#: it twice
UNPUBLISHED = 4


def http_url(text: str) -> str:
    """A ``--url`` of a service's HTTP API, without its trailing slash; anything but an
    http(s) address with a host is refused as the flag's error."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text.rstrip("/")


def replica_url_argument(parser: argparse.ArgumentParser, service: str) -> None:
    """``--url``: the HTTP address of a replica of ``service``, from the environment's
    variable of ``service`` (:data:`URL_VARIABLES`) by default."""
    variable = URL_VARIABLES[service]
    parser.add_argument(
        "--url",
        type=http_url,
        default=os.environ.get(variable, DEFAULT_URL),
        help=f"{REPLICAS[service]}'s HTTP address ({variable}, {DEFAULT_URL})",
    )


def api_token(command: str) -> str | None:
    """``PUMPFLOW_API_TOKEN``, or None after saying it is missing."""
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        print(f"pumpflow {command}: {TOKEN_VARIABLE} is not set", file=sys.stderr)
    return token


def failure(command: str, url: str, exc: OSError, *, service: str) -> str:
    """The one line that says why a call to a replica of ``service`` at ``url`` failed:
    its refusal in words (the service's reason, not its JSON), that it did not answer, or
    that another service answers there."""
    if not isinstance(exc, urllib.error.HTTPError):
        return f"pumpflow {command}: {url} does not answer: {exc}"
    there = _service_at(url) if exc.code == 404 else None
    if there is not None and there != service:
        wanted = REPLICAS[service]
        return (
            f"pumpflow {command}: {url} serves the {there} service, not {wanted}: give --url "
            f"(or {URL_VARIABLES[service]}) {wanted}'s address"
        )
    if exc.code == 404 and there is None and _reason(exc) == "Not Found":
        # no such route, and no service says it serves there: not one of ours
        return (
            f"pumpflow {command}: {url} has no such endpoint (404 Not Found): is it "
            f"{REPLICAS[service]}'s HTTP address? (--url, {URL_VARIABLES[service]})"
        )
    if exc.code == 401:
        return (
            f"pumpflow {command}: {url} refused the bearer token (401 unauthorized): it is "
            f"missing or wrong; set {TOKEN_VARIABLE} to the service's own {TOKEN_VARIABLE}"
        )
    said = _reason(exc)
    if exc.code == 503:
        return f"pumpflow {command}: {url} cannot do it now (503: unavailable): {said}"
    return f"pumpflow {command}: {url} refused it ({exc.code} {exc.reason}): {said}"


def _reason(exc: urllib.error.HTTPError) -> str:
    """What the service said: its JSON body's ``detail`` (FastAPI's), else its text, on
    one line and cut short."""
    text = exc.read().decode("utf-8", "replace")
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    if isinstance(detail, list):  # a request the API's validation refused
        detail = "; ".join(str(d.get("msg", d) if isinstance(d, dict) else d) for d in detail)
    said = " ".join(str(detail).split()) or "no reason given"
    if len(said) > QUOTED_MAX_CHARS:
        said = said[: QUOTED_MAX_CHARS - 3] + "..."
    return said


def _service_at(url: str) -> str | None:
    """The service whose replica serves ``url`` (its ``/healthz`` says), if it says."""
    try:
        service = get_json(f"{url}/healthz").get("service")
    except (OSError, ValueError, AttributeError):
        return None
    return service if isinstance(service, str) else None


def get_json(url: str) -> dict:
    """GET ``url``'s JSON body (raises urllib.error.HTTPError, OSError)."""
    with urllib.request.urlopen(urllib.request.Request(url), timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, token: str, *, waits_s: float = 0.0) -> dict:
    """POST ``body`` as JSON with the bearer ``token``; the answer's JSON body.

    ``waits_s``: how long the service may wait before it answers (on top of the call's
    own allowance)."""
    return send_json(url, body, token, waits_s=waits_s)


def send_json(
    url: str, body: dict | None, token: str, *, method: str = "POST", waits_s: float = 0.0
) -> dict:
    """Send ``body`` as JSON (None: no body) by ``method`` with the bearer ``token``; the
    answer's JSON body (raises urllib.error.HTTPError, OSError)."""
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers=headers,
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S + waits_s) as response:
        return json.loads(response.read())
