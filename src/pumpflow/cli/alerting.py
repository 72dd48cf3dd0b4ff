"""Alerts to a person: Prometheus' firing alerts become chat messages, once each.

Transport-free: :class:`AlertNotifier` is handed what Prometheus answered on
``/api/v1/alerts`` (:func:`parse_alerts`), a clock and a poster (an async function
that POSTs JSON to a URL and returns a :class:`PostResult`); ``pumpflow notify``
(:mod:`pumpflow.cli.notify`) wires it to HTTP.

- **Transitions, deduplicated.** An alert is posted when it starts firing and when it
  resolves (it leaves the firing set), never again while it fires. Alerts are told
  apart by their labels; ``pending`` ones (inside their ``for:``) are not firing yet.
- **Targets.** Telegram bots (``POST {api}/bot<token>/sendMessage``, JSON ``chat_id``,
  ``text``, ``parse_mode``) and Discord webhooks (``POST <webhook url>``, JSON
  ``content``). Each target has its own queue.
- **Rate limit.** One post per target per ``min_interval_s``; messages queued meanwhile
  go out together in the next post, as many as the target's length limit takes.
- **Retries.** A post that fails (no connection, a 5xx, a 429) is tried again after an
  exponential backoff (a 429's ``retry_after`` when longer), the messages kept in
  order; one the target refuses (another 4xx) is dropped and counted, since sending it
  again would be refused again. The queue is bounded: the oldest messages go first.
- **Bad answers.** A malformed answer from Prometheus raises :class:`AlertSourceError`
  naming the field; the caller logs it and polls again, and the firing set is kept,
  so an outage of Prometheus resolves nothing.

Secrets (the bot token, the webhook URL) are in the targets' URLs only: nothing here
logs a URL.
"""

from __future__ import annotations

import html
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pumpflow.common.clock import Clock
from pumpflow.common.text import counted

log = logging.getLogger("pumpflow.notify")

State = Literal["firing", "resolved"]


class AlertSourceError(ValueError):
    """What Prometheus answered is not an alerts list; names the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert as Prometheus reports it."""

    name: str
    labels: Mapping[str, str]
    summary: str = ""
    description: str = ""
    severity: str = ""

    @property
    def identity(self) -> tuple[tuple[str, str], ...]:
        """What tells two alerts apart: every label (the alert's name is one)."""
        return tuple(sorted(self.labels.items()))


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification:
    """An alert that started firing, or resolved."""

    alert: Alert
    state: State


@dataclass(frozen=True, slots=True, kw_only=True)
class PostResult:
    """How a target answered a post: its HTTP status (0: no answer at all)."""

    status: int
    #: seconds the target asks to wait (a 429's retry_after)
    retry_after_s: float | None = None
    #: why there was no answer (the exception's type; never a URL)
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def refused(self) -> bool:
        """A 4xx but 429: the same message would be refused again."""
        return 400 <= self.status < 500 and self.status != 429


Poster = Callable[[str, dict[str, Any]], Awaitable[PostResult]]


def parse_alerts(body: Any) -> list[Alert]:
    """The firing alerts of an ``/api/v1/alerts`` answer (decoded JSON)."""
    if not isinstance(body, Mapping):
        raise AlertSourceError("the answer is not a JSON object")
    if body.get("status") != "success":
        raise AlertSourceError(f"status is {body.get('status')!r}, not 'success': {body}")
    data = body.get("data")
    if not isinstance(data, Mapping) or not isinstance(data.get("alerts"), list):
        raise AlertSourceError("data.alerts is not a list")
    alerts = []
    for index, raw in enumerate(data["alerts"]):
        where = f"data.alerts[{index}]"
        if not isinstance(raw, Mapping):
            raise AlertSourceError(f"{where} is not an object")
        if raw.get("state") != "firing":
            continue  # pending: inside its `for:`, not an alert yet
        labels = raw.get("labels")
        if not isinstance(labels, Mapping) or not isinstance(labels.get("alertname"), str):
            raise AlertSourceError(f"{where}.labels.alertname is missing")
        annotations = raw.get("annotations") or {}
        if not isinstance(annotations, Mapping):
            raise AlertSourceError(f"{where}.annotations is not an object")
        alerts.append(
            Alert(
                name=labels["alertname"],
                labels={str(k): str(v) for k, v in labels.items()},
                summary=str(annotations.get("summary", "")),
                description=str(annotations.get("description", "")),
                severity=str(labels.get("severity", "")),
            )
        )
    return alerts


def _detail_labels(alert: Alert) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in sorted(alert.labels.items()) if k not in ("alertname", "severity")
    )


class Target:
    """Where messages go, and how a batch of them is written for it."""

    #: how a target is named in logs (never its URL)
    kind: str = "target"
    #: the longest text a message may have
    max_length: int = 2000

    def __init__(self, url: str):
        self.url = url

    def format(self, notification: Notification) -> str:
        raise NotImplementedError

    def body(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TelegramTarget(Target):
    """A Telegram bot's sendMessage to one chat, in Telegram's HTML."""

    kind = "telegram"
    max_length = 4096

    def __init__(self, *, token: str, chat_id: str, api_url: str = "https://api.telegram.org"):
        super().__init__(f"{api_url.rstrip('/')}/bot{token}/sendMessage")
        self.chat_id = chat_id

    def format(self, notification: Notification) -> str:
        alert, e = notification.alert, html.escape
        head = f"<b>{notification.state.upper()}</b> [{e(alert.severity or 'alert')}] "
        lines = [head + f"<b>{e(alert.name)}</b>"]
        lines += [e(line) for line in (alert.summary, alert.description) if line]
        if labels := _detail_labels(alert):
            lines.append(f"<i>{e(labels)}</i>")
        return "\n".join(lines)

    def body(self, text: str) -> dict[str, Any]:
        return {"chat_id": self.chat_id, "text": text, "parse_mode": "HTML"}


class DiscordTarget(Target):
    """A Discord webhook, in Discord's markdown; mentions in label values ping nobody."""

    kind = "discord"
    max_length = 2000

    def format(self, notification: Notification) -> str:
        alert = notification.alert
        lines = [f"**{notification.state.upper()}** [{alert.severity or 'alert'}] **{alert.name}**"]
        lines += [line for line in (alert.summary, alert.description) if line]
        if labels := _detail_labels(alert):
            lines.append(f"*{labels}*")
        return "\n".join(lines)

    def body(self, text: str) -> dict[str, Any]:
        return {"content": text, "allowed_mentions": {"parse": []}}


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifierConfig:
    """How often a target is posted to and how failures are retried."""

    #: at least this long between two posts to one target
    min_interval_s: float = 1.0
    #: first and longest pause before a failed post is tried again
    retry_initial_s: float = 2.0
    retry_max_s: float = 300.0
    #: messages kept per target while it fails (the oldest are dropped beyond)
    max_queued: int = 500

    def __post_init__(self) -> None:
        if self.min_interval_s < 0:
            raise ValueError("min_interval_s must not be negative")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")
        if self.max_queued < 1:
            raise ValueError("max_queued must be at least 1")


@dataclass(slots=True)
class _Outbox:
    target: Target
    queue: deque[str] = field(default_factory=deque)
    next_post_at: float = 0.0
    failures: int = 0
    sent: int = 0
    dropped: int = 0


class AlertNotifier:
    """Posts alerts' firing and resolved transitions to every target; see the module."""

    def __init__(
        self,
        targets: Iterable[Target],
        *,
        poster: Poster,
        clock: Clock,
        config: NotifierConfig | None = None,
    ):
        self.config = config or NotifierConfig()
        self._outboxes = [_Outbox(target) for target in targets]
        if not self._outboxes:
            raise ValueError("no target to notify")
        self._post = poster
        self._clock = clock
        #: identity -> the alert, for every alert firing at the last observation
        self.firing: dict[tuple[tuple[str, str], ...], Alert] = {}

    @property
    def queued(self) -> int:
        return sum(len(o.queue) for o in self._outboxes)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per target kind: messages sent, dropped and queued."""
        return {
            o.target.kind: {"sent": o.sent, "dropped": o.dropped, "queued": len(o.queue)}
            for o in self._outboxes
        }

    def observe(self, alerts: Iterable[Alert]) -> list[Notification]:
        """Take the alerts firing now; queue and return what started or stopped firing."""
        now_firing: dict[tuple[tuple[str, str], ...], Alert] = {}
        for alert in alerts:
            now_firing.setdefault(alert.identity, alert)
        changes = [
            Notification(alert=alert, state="firing")
            for identity, alert in now_firing.items()
            if identity not in self.firing
        ]
        changes += [
            Notification(alert=alert, state="resolved")
            for identity, alert in self.firing.items()
            if identity not in now_firing
        ]
        self.firing = now_firing
        for notification in changes:
            self.notify(notification)
        return changes

    def notify(self, notification: Notification) -> None:
        """Queue ``notification`` for every target (one not of Prometheus' alerts: the
        notifier's own about its source)."""
        log.info("alert %s %s", notification.alert.name, notification.state)
        for outbox in self._outboxes:
            outbox.queue.append(outbox.target.format(notification))
            while len(outbox.queue) > self.config.max_queued:
                outbox.queue.popleft()
                outbox.dropped += 1

    async def deliver(self) -> int:
        """Post to each target whose turn it is; return the messages delivered."""
        delivered = 0
        for outbox in self._outboxes:
            if outbox.queue and self._clock.now() >= outbox.next_post_at:
                delivered += await self._post_next(outbox)
        return delivered

    def next_due(self) -> float | None:
        """When the next post is due (None: nothing is queued)."""
        due = [o.next_post_at for o in self._outboxes if o.queue]
        return min(due) if due else None

    async def _post_next(self, outbox: _Outbox) -> int:
        target, config = outbox.target, self.config
        texts = self._batch(outbox)
        try:
            result = await self._post(target.url, target.body("\n\n".join(texts)))
        except Exception as exc:  # a poster that breaks its contract must not stop alerts
            result = PostResult(status=0, error=type(exc).__name__)
        now = self._clock.now()
        if result.ok or result.refused:
            for _ in texts:
                outbox.queue.popleft()
            outbox.failures = 0
            outbox.next_post_at = now + config.min_interval_s
            if result.ok:
                outbox.sent += len(texts)
                return len(texts)
            outbox.dropped += len(texts)
            log.error(
                "%s refused %s with HTTP %d: dropped (check its settings)",
                target.kind, counted(len(texts), "alert message"), result.status,
            )  # fmt: skip
            return 0
        outbox.failures += 1
        backoff = min(config.retry_max_s, config.retry_initial_s * 2 ** (outbox.failures - 1))
        wait = max(backoff, result.retry_after_s or 0.0)
        outbox.next_post_at = now + wait
        log.warning(
            "%s: posting %s failed (%s, try %d): again in %.1f s",
            target.kind, counted(len(texts), "alert message"),
            result.error or f"HTTP {result.status}", outbox.failures, wait,
        )  # fmt: skip
        return 0

    @staticmethod
    def _batch(outbox: _Outbox) -> list[str]:
        """The queued messages that fit one post (one at least, cut to the limit)."""
        limit = outbox.target.max_length
        first = outbox.queue[0]
        texts = [first[:limit]]
        size = len(texts[0])
        for text in list(outbox.queue)[1:]:
            size += 2 + len(text)
            if size > limit:
                break
            texts.append(text)
        return texts
