"""``pumpflow notify``: Prometheus' alerts to Telegram and Discord.

Polls ``{PUMPFLOW_NOTIFY_PROMETHEUS_URL}/api/v1/alerts`` every
``PUMPFLOW_NOTIFY_INTERVAL_S`` and posts each alert when it starts firing and when it
resolves (:class:`~pumpflow.cli.alerting.AlertNotifier`: deduplicated, rate-limited,
retried with backoff). Targets, from the environment:

- Telegram: ``PUMPFLOW_NOTIFY_TELEGRAM_TOKEN`` (the bot's token) and
  ``PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID`` (``PUMPFLOW_NOTIFY_TELEGRAM_API_URL`` for
  another Bot API server);
- Discord: ``PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL``.

Prometheus failing to give its alerts for ``PUMPFLOW_NOTIFY_SOURCE_DOWN_AFTER_S`` is
posted as an alert of its own (``AlertsUnreadable``), resolved once it answers: no alert
of the stack reaches anyone meanwhile, and silence must not read as all well.

With neither it says so and exits 0: notifying is off. The token and the webhook URL
are secrets: never logged, and masked in anything that is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import Field, SecretStr

from pumpflow.cli.alerting import (
    Alert,
    AlertNotifier,
    AlertSourceError,
    DiscordTarget,
    Notification,
    NotifierConfig,
    PostResult,
    Target,
    TelegramTarget,
    parse_alerts,
)
from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.runtime.logging import configure_logging
from pumpflow.common.runtime.settings import CommonSettings, SettingsError
from pumpflow.common.runtime.signals import stopped_by_signals

log = logging.getLogger("pumpflow.notify")

#: the name of the notifier's own alert, posted while Prometheus' alerts cannot be read
SOURCE_ALERT = "AlertsUnreadable"

NO_TARGET = (
    "pumpflow notify: no webhook configured, so alerts reach nobody: set "
    "PUMPFLOW_NOTIFY_TELEGRAM_TOKEN and PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID (a Telegram bot), "
    "or PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL (a Discord webhook)"
)


#: what the notifier polls and posts to: a URL without its scheme would fail every time
HTTP_URL_PATTERN = r"^https?://"


class NotifySettings(CommonSettings):
    """Where alerts come from and go to. Environment: ``PUMPFLOW_NOTIFY_*``."""

    service: str = Field("notify", description="name in the logs")
    notify_prometheus_url: str = Field(
        "http://127.0.0.1:9090",
        pattern=HTTP_URL_PATTERN,
        description="Prometheus, whose /api/v1/alerts is polled",
    )
    notify_interval_s: float = Field(15.0, gt=0, description="seconds between two polls")
    notify_timeout_s: float = Field(10.0, gt=0, description="seconds an HTTP request may take")
    notify_min_interval_s: float = Field(
        1.0, ge=0, description="at least this long between two posts to one target"
    )
    notify_source_down_after_s: float = Field(
        120.0,
        gt=0,
        description="seconds Prometheus may fail to give its alerts before that is posted as "
        "an alert of its own (AlertsUnreadable), resolved once it answers again",
    )
    notify_retry_initial_s: float = Field(2.0, gt=0, description="first pause before a retry")
    notify_retry_max_s: float = Field(300.0, gt=0, description="longest pause before a retry")
    notify_telegram_token: SecretStr | None = Field(None, description="Telegram bot token")
    notify_telegram_chat_id: str | None = Field(None, description="Telegram chat to post to")
    notify_telegram_api_url: str = Field(
        "https://api.telegram.org", pattern=HTTP_URL_PATTERN, description="Telegram Bot API server"
    )
    notify_discord_webhook_url: SecretStr | None = Field(
        None, description="Discord webhook URL (holds its token)"
    )

    def targets(self) -> list[Target]:
        """The configured targets; a Telegram bot needs both its token and its chat."""
        targets: list[Target] = []
        token = self.notify_telegram_token.get_secret_value() if self.notify_telegram_token else ""
        chat = self.notify_telegram_chat_id or ""
        if bool(token) != bool(chat):
            missing = "TELEGRAM_CHAT_ID" if token else "TELEGRAM_TOKEN"
            raise SettingsError(
                f"PUMPFLOW_NOTIFY_{missing}: needed too, a Telegram bot posts with its token "
                "to one chat"
            )
        if token:
            targets.append(
                TelegramTarget(token=token, chat_id=chat, api_url=self.notify_telegram_api_url)
            )
        if self.notify_discord_webhook_url is not None:
            url = self.notify_discord_webhook_url.get_secret_value()
            if url and not re.match(HTTP_URL_PATTERN, url):
                # not shown: the URL holds the webhook's token
                raise SettingsError("PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL: not an http(s) URL")
            if url:
                targets.append(DiscordTarget(url))
        return targets

    def notifier_config(self) -> NotifierConfig:
        try:
            return NotifierConfig(
                min_interval_s=self.notify_min_interval_s,
                retry_initial_s=self.notify_retry_initial_s,
                retry_max_s=self.notify_retry_max_s,
            )
        except ValueError as exc:
            raise SettingsError(f"PUMPFLOW_NOTIFY_RETRY_*: {exc}") from None


def _retry_after(response: Any) -> float | None:
    """A 429's wait: the Retry-After header, or Telegram's and Discord's JSON field."""
    header = response.headers.get("retry-after")
    with contextlib.suppress(ValueError, TypeError):
        if header is not None:
            return float(header)
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        wait = body.get("retry_after", (body.get("parameters") or {}).get("retry_after"))
        if wait is not None:
            return float(wait)
    return None


class HttpTransport:
    """Prometheus' alerts in, posts out, over httpx; never raises for what the network does."""

    def __init__(self, prometheus_url: str, *, timeout_s: float):
        import httpx

        self._httpx = httpx
        self._alerts_url = f"{prometheus_url.rstrip('/')}/api/v1/alerts"
        self._client = httpx.AsyncClient(timeout=timeout_s)
        # httpx logs every request's URL at INFO, and a target's URL holds its secret
        logging.getLogger("httpx").setLevel(logging.WARNING)

    async def alerts(self) -> Any:
        """Prometheus' answer, decoded; AlertSourceError when there is none to read."""
        try:
            response = await self._client.get(self._alerts_url)
        except self._httpx.HTTPError as exc:
            raise AlertSourceError(
                f"Prometheus at {self._alerts_url} does not answer ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise AlertSourceError(f"Prometheus answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise AlertSourceError("Prometheus' answer is not JSON") from None

    async def post(self, url: str, body: dict[str, Any]) -> PostResult:
        try:
            response = await self._client.post(url, json=body)
        except self._httpx.HTTPError as exc:
            return PostResult(status=0, error=type(exc).__name__)
        retry_after = _retry_after(response) if response.status_code == 429 else None
        return PostResult(status=response.status_code, retry_after_s=retry_after)

    async def close(self) -> None:
        await self._client.aclose()


def source_alert(source: str, description: str) -> Alert:
    """The notifier's own alert: Prometheus' alerts cannot be read, so none reaches anyone."""
    return Alert(
        name=SOURCE_ALERT,
        labels={"alertname": SOURCE_ALERT, "severity": "critical", "source": source},
        severity="critical",
        summary="pumpflow notify cannot read Prometheus' alerts: no alert of the stack is "
        "posted until it can",
        description=description,
    )


async def run_notifier(
    notifier: AlertNotifier,
    fetch: Callable[[], Awaitable[Any]],
    *,
    clock: Clock,
    interval_s: float,
    stop: asyncio.Event,
    source: str = "Prometheus",
    source_down_after_s: float = 120.0,
) -> None:
    """Poll, post what changed, retry what failed, until ``stop`` is set. Alerts that
    cannot be read for ``source_down_after_s`` are posted as an alert of their own: the
    silence would otherwise read as nothing wrong."""
    failing_since: float | None = None
    said: Alert | None = None
    while not stop.is_set():
        try:
            alerts = parse_alerts(await fetch())
        except AlertSourceError as exc:
            log.warning("reading alerts: %s; polling again in %.0f s", exc, interval_s)
            now = clock.now()
            failing_since = now if failing_since is None else failing_since
            if said is None and now - failing_since >= source_down_after_s:
                said = source_alert(
                    source,
                    f"{exc}, for {now - failing_since:.0f} s "
                    "(the alerts firing before are not resolved meanwhile)",
                )
                notifier.notify(Notification(alert=said, state="firing"))
        else:
            failing_since = None
            if said is not None:
                notifier.notify(Notification(alert=said, state="resolved"))
                said = None
            notifier.observe(alerts)
        next_poll = clock.now() + interval_s
        while not stop.is_set():
            await notifier.deliver()
            now = clock.now()
            if now >= next_poll:
                break
            due = notifier.next_due()
            wake = next_poll if due is None else min(next_poll, max(due, now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - now)):
                    await stop.wait()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "notify",
        help="post Prometheus' alerts to a Telegram bot or a Discord webhook",
        description=(
            "Poll Prometheus' /api/v1/alerts and post each alert when it starts firing "
            "and when it resolves. Settings from the environment: "
            "PUMPFLOW_NOTIFY_PROMETHEUS_URL, PUMPFLOW_NOTIFY_TELEGRAM_TOKEN and "
            "PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID, PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL, "
            "PUMPFLOW_NOTIFY_INTERVAL_S. Prometheus giving no alerts for "
            "PUMPFLOW_NOTIFY_SOURCE_DOWN_AFTER_S (120) is posted as an alert of its own, "
            "AlertsUnreadable. Without a target it exits 0."
        ),
    )
    parser.set_defaults(handler=notify_command)


def notify_command(args: argparse.Namespace) -> int:
    try:
        settings = NotifySettings.load()
        targets = settings.targets()
        config = settings.notifier_config()
    except SettingsError as exc:
        print(f"pumpflow notify: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print(NO_TARGET, file=sys.stderr)
        return 0
    configure_logging(settings)
    return asyncio.run(_serve(settings, targets, config))


async def _serve(settings: NotifySettings, targets: list[Target], config: NotifierConfig) -> int:
    clock = WallClock()
    transport = HttpTransport(settings.notify_prometheus_url, timeout_s=settings.notify_timeout_s)
    notifier = AlertNotifier(targets, poster=transport.post, clock=clock, config=config)
    stop = asyncio.Event()
    log.info(
        "notifying %s of the alerts of %s every %g s",
        ", ".join(t.kind for t in targets), settings.notify_prometheus_url,
        settings.notify_interval_s,
    )  # fmt: skip
    try:
        with stopped_by_signals(stop):
            await run_notifier(
                notifier, transport.alerts, clock=clock, interval_s=settings.notify_interval_s,
                stop=stop, source=settings.notify_prometheus_url,
                source_down_after_s=settings.notify_source_down_after_s,
            )  # fmt: skip
    finally:
        await transport.close()
        log.info("stopped: %s", notifier.stats())
    return 0
