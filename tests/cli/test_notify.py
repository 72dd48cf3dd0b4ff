"""``pumpflow notify``: alerts reach a person, against real local HTTP fakes of
Prometheus, a Telegram bot and a Discord webhook; and the notifier's rules on a replay
clock (deduplication, rate limit, backoff, refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

import pytest

from pumpflow.cli.alerting import (
    Alert,
    AlertNotifier,
    AlertSourceError,
    DiscordTarget,
    NotifierConfig,
    PostResult,
    TelegramTarget,
    parse_alerts,
)
from pumpflow.cli.main import main
from pumpflow.cli.notify import NO_TARGET, HttpTransport, NotifySettings, _serve, run_notifier
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.common.testing.waiting import eventually

from .fake_webhooks import FakeWebhooks, alert, answer, fake_webhooks

TOKEN = "123456:telegram-bot-secret-token"
DISCORD_TOKEN = "discord-webhook-secret-token"
CHAT = "-100200300"

# ---------------------------------------------------------------- against local HTTP fakes


@contextlib.asynccontextmanager
async def notifying(fake: FakeWebhooks, **config: float) -> AsyncIterator[AlertNotifier]:
    """``run_notifier`` on both targets of ``fake``, polling every 50 ms."""
    settings = NotifySettings.load(
        notify_prometheus_url=fake.base,
        notify_telegram_token=TOKEN,
        notify_telegram_chat_id=CHAT,
        notify_telegram_api_url=fake.base,
        notify_discord_webhook_url=f"{fake.base}/api/webhooks/42/{DISCORD_TOKEN}",
    )
    clock = WallClock()
    transport = HttpTransport(settings.notify_prometheus_url, timeout_s=5.0)
    notifier = AlertNotifier(
        settings.targets(),
        poster=transport.post,
        clock=clock,
        config=NotifierConfig(
            min_interval_s=config.get("min_interval_s", 0.0),
            retry_initial_s=config.get("retry_initial_s", 0.05),
            retry_max_s=1.0,
        ),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_notifier(
            notifier,
            transport.alerts,
            clock=clock,
            interval_s=0.05,
            stop=stop,
            source=settings.notify_prometheus_url,
            source_down_after_s=config.get("source_down_after_s", 120.0),
        )
    )
    try:
        yield notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)
        await transport.close()


async def polls(fake: FakeWebhooks, count: int) -> None:
    """Wait until Prometheus was asked ``count`` more times."""
    until = fake.polls + count
    await eventually(lambda: fake.polls >= until, 10.0, what=f"{count} more polls")


async def test_a_firing_alert_is_posted_once_in_each_format_then_its_resolution(caplog):
    caplog.set_level(logging.DEBUG)
    async with fake_webhooks() as fake, notifying(fake):
        fake.alerts_answer = answer(alert("FeedDisconnected"), alert("Other", state="pending"))
        await eventually(
            lambda: fake.of("telegram") and fake.of("discord"), 10.0, what="both posts"
        )
        await polls(fake, 5)  # still firing: nothing more
        [telegram] = fake.of("telegram")
        [discord] = fake.of("discord")
        assert telegram.path == f"/bot{TOKEN}/sendMessage"
        assert telegram.body["chat_id"] == CHAT and telegram.body["parse_mode"] == "HTML"
        text = telegram.body["text"]
        assert text.startswith("<b>FIRING</b> [critical] <b>FeedDisconnected</b>")
        # annotations are escaped for Telegram's HTML
        assert "FeedDisconnected summary\nFeedDisconnected &lt;details&gt;" in text
        assert "Other" not in text  # pending: not firing yet
        assert discord.path == f"/api/webhooks/42/{DISCORD_TOKEN}"
        assert discord.body["content"].startswith("**FIRING** [critical] **FeedDisconnected**")
        assert discord.body["allowed_mentions"] == {"parse": []}

        fake.alerts_answer = answer()
        await eventually(
            lambda: len(fake.of("telegram")) == 2 and len(fake.of("discord")) == 2,
            10.0,
            what="the resolutions",
        )
        assert fake.of("telegram")[1].body["text"].startswith("<b>RESOLVED</b> [critical]")
        assert fake.of("discord")[1].body["content"].startswith("**RESOLVED** [critical]")
        await polls(fake, 3)
        assert len(fake.posted) == 4
    # the secrets are in the URLs only, which nothing logs
    assert TOKEN not in caplog.text and DISCORD_TOKEN not in caplog.text
    assert "FeedDisconnected firing" in caplog.text


async def test_a_failing_webhook_is_retried_with_backoff_until_it_takes_the_message():
    async with fake_webhooks() as fake, notifying(fake):
        # Telegram's and Discord's posts share the failures: 503, 429 (retry_after), 500
        fake.failures = [503, 429, 500, 503]
        fake.alerts_answer = answer(alert("BreakerTripped", breaker="stale"))
        await eventually(lambda: fake.of("telegram") and fake.of("discord"), 10.0, what="delivery")
    assert [p.status for p in fake.posted[:4]] == [503, 429, 500, 503]
    # the same message each time, delivered once
    texts = {p.body.get("text") or p.body.get("content") for p in fake.posted}
    assert len(fake.of("telegram")) == 1 and len(fake.of("discord")) == 1
    assert len(texts) == 2 and all("BreakerTripped" in t and "breaker=stale" in t for t in texts)


@pytest.mark.parametrize(
    "bad",
    [b"<html>gateway timeout</html>", {"status": "error", "error": "bad"}, {"status": "success"}],
    ids=["not-json", "error-status", "no-alerts"],
)
async def test_bad_answers_from_prometheus_crash_nothing_and_resolve_nothing(bad, caplog):
    async with fake_webhooks() as fake, notifying(fake):
        fake.alerts_answer = answer(alert("TradingHalted", state="firing"))
        await eventually(lambda: fake.of("discord"), 10.0, what="the firing post")
        fake.alerts_answer, fake.alerts_status = bad, 502 if isinstance(bad, bytes) else 200
        await polls(fake, 5)
        assert len(fake.posted) == 2  # an outage of Prometheus is no resolution
        fake.alerts_answer, fake.alerts_status = answer(), 200
        await eventually(lambda: len(fake.of("discord")) == 2, 10.0, what="the resolution")
    assert "reading alerts:" in caplog.text


async def test_prometheus_failing_for_long_is_posted_as_an_alert_and_its_return_resolves_it(
    caplog,
):
    """Prometheus away (down, or answering no alerts list) leaves every alert of the stack
    unsaid: past ``source_down_after_s`` that is posted as an alert of its own, once,
    resolved once Prometheus answers again; the alerts firing before are neither resolved
    nor posted again meanwhile."""
    async with fake_webhooks() as fake, notifying(fake, source_down_after_s=0.3):
        fake.alerts_answer = answer(alert("TradingHalted"))
        await eventually(lambda: fake.of("discord"), 10.0, what="the firing post")
        fake.alerts_answer, fake.alerts_status = b"<html>bad gateway</html>", 502
        await eventually(lambda: len(fake.of("discord")) == 2, 10.0, what="the source's alert")
        down = fake.of("discord")[1].body["content"]
        assert down.startswith("**FIRING** [critical] **AlertsUnreadable**"), down
        assert "HTTP 502" in down and fake.base in down
        await polls(fake, 10)
        assert len(fake.of("discord")) == 2  # said once
        fake.alerts_answer, fake.alerts_status = answer(alert("TradingHalted")), 200
        await eventually(lambda: len(fake.of("discord")) == 3, 10.0, what="its resolution")
        assert (
            fake.of("discord")[2]
            .body["content"]
            .startswith("**RESOLVED** [critical] **AlertsUnreadable**")
        )
        await polls(fake, 5)
        assert len(fake.of("discord")) == 3  # TradingHalted fired all along: not again
        assert len(fake.of("telegram")) == 3


async def test_prometheus_unreachable_is_waited_out():
    async with fake_webhooks() as fake:
        base = fake.base
    # the fake has stopped: nothing listens there any more
    transport = HttpTransport(base, timeout_s=2.0)
    with pytest.raises(AlertSourceError, match="does not answer"):
        await transport.alerts()
    await transport.close()


async def test_a_notifier_stopped_by_a_signal_takes_its_handlers_away_before_the_loop_closes():
    """Left to the loop's close, which closes its wakeup pipe first, a second SIGINT in
    between wrote to it: "Exception ignored ... BrokenPipeError", a traceback on stderr
    (a double Ctrl-C, or `timeout -s INT`, which signals the process and its group)."""
    settings = NotifySettings.load(
        notify_prometheus_url="http://127.0.0.1:1",
        notify_discord_webhook_url=f"http://127.0.0.1:1/api/webhooks/1/{DISCORD_TOKEN}",
        notify_interval_s=0.05,
    )
    asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
    assert await _serve(settings, settings.targets(), settings.notifier_config()) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_without_a_webhook_notify_says_so_and_exits_cleanly(monkeypatch, capsys):
    for name in (
        "PUMPFLOW_NOTIFY_TELEGRAM_TOKEN",
        "PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID",
        "PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    assert main(["notify"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == NO_TARGET
    assert "PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL" in err


def test_a_telegram_token_without_its_chat_is_a_settings_error(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_NOTIFY_TELEGRAM_TOKEN", TOKEN)
    monkeypatch.delenv("PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID", raising=False)
    assert main(["notify"]) == 2
    err = capsys.readouterr().err
    assert "PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID" in err and TOKEN not in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PUMPFLOW_NOTIFY_DISCORD_WEBHOOK_URL", f"discord.com/api/webhooks/1/{DISCORD_TOKEN}"),
        ("PUMPFLOW_NOTIFY_PROMETHEUS_URL", "prometheus:9090"),
        ("PUMPFLOW_NOTIFY_TELEGRAM_API_URL", "api.telegram.org"),
    ],
)
def test_a_url_of_no_http_scheme_is_a_settings_error_naming_it(
    variable, value, monkeypatch, capsys
):
    """Not a notifier that runs and whose every poll or post fails."""
    monkeypatch.setenv("PUMPFLOW_NOTIFY_TELEGRAM_TOKEN", TOKEN)
    monkeypatch.setenv("PUMPFLOW_NOTIFY_TELEGRAM_CHAT_ID", CHAT)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):  # before a notifier polls for ever
        NotifySettings.load().targets()
    assert main(["notify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pumpflow notify: ") and variable in err
    assert DISCORD_TOKEN not in err and TOKEN not in err


def test_the_settings_never_show_their_secrets():
    settings = NotifySettings.load(
        notify_telegram_token=TOKEN,
        notify_telegram_chat_id=CHAT,
        notify_discord_webhook_url=f"https://discord.test/api/webhooks/1/{DISCORD_TOKEN}",
    )
    shown = repr(settings) + str(settings.model_dump()) + repr(settings.targets())
    assert TOKEN not in shown and DISCORD_TOKEN not in shown


# ---------------------------------------------------------------- the notifier's rules


class Recorder:
    """A poster answering from a script of statuses (then 200), recording each post."""

    def __init__(self, *statuses: int, retry_after_s: float | None = None):
        self.statuses = list(statuses)
        self.retry_after_s = retry_after_s
        self.posts: list[tuple[str, dict]] = []

    async def __call__(self, url: str, body: dict) -> PostResult:
        self.posts.append((url, body))
        status = self.statuses.pop(0) if self.statuses else 200
        return PostResult(status=status, retry_after_s=self.retry_after_s)


def firing(name: str, **labels: str) -> Alert:
    return Alert(name=name, labels={"alertname": name, **labels}, summary=f"{name}!")


async def test_transitions_are_deduplicated_and_rate_limited():
    clock = ReplayClock(0.0)
    poster = Recorder()
    notifier = AlertNotifier(
        [DiscordTarget("http://x/hook")],
        poster=poster,
        clock=clock,
        config=NotifierConfig(min_interval_s=5.0),
    )
    a, b = firing("A"), firing("B", instance="1")
    assert [n.state for n in notifier.observe([a, a])] == ["firing"]  # listed twice
    assert await notifier.deliver() == 1
    assert notifier.observe([a]) == []  # still firing: nothing new
    notifier.observe([a, b])
    notifier.observe([b])  # A resolved
    assert await notifier.deliver() == 0  # 5 s between posts
    assert notifier.next_due() == 5.0
    await clock.advance(5.0)
    assert await notifier.deliver() == 2  # what waited goes out in one post
    contents = [body["content"] for _, body in poster.posts]
    assert len(contents) == 2
    assert "**FIRING**" in contents[1] and "**B**" in contents[1]
    assert "**RESOLVED**" in contents[1] and "**A**" in contents[1]
    assert notifier.next_due() is None


async def test_failures_back_off_exponentially_and_a_refusal_is_dropped():
    clock = ReplayClock(0.0)
    poster = Recorder(500, 0, 503, 400)
    notifier = AlertNotifier(
        [TelegramTarget(token="t", chat_id="c", api_url="http://x")],
        poster=poster,
        clock=clock,
        config=NotifierConfig(min_interval_s=1.0, retry_initial_s=2.0, retry_max_s=5.0),
    )
    notifier.observe([firing("A")])
    waits = []
    for _ in range(3):
        assert await notifier.deliver() == 0
        waits.append(notifier.next_due() - clock.now())
        await clock.advance_to(notifier.next_due())
    assert waits == [2.0, 4.0, 5.0]  # doubled, up to the longest
    assert await notifier.deliver() == 0  # 400: refused, dropped
    assert notifier.stats()["telegram"] == {"sent": 0, "dropped": 1, "queued": 0}
    notifier.observe([])  # A resolved: a new message, and the target takes it
    await clock.advance(1.0)
    assert await notifier.deliver() == 1
    assert len(poster.posts) == 5
    assert poster.posts[0][0] == "http://x/bott/sendMessage"


async def test_a_429_waits_as_long_as_the_target_asks():
    clock = ReplayClock(0.0)
    notifier = AlertNotifier(
        [DiscordTarget("http://x/hook")],
        poster=Recorder(429, retry_after_s=30.0),
        clock=clock,
        config=NotifierConfig(retry_initial_s=2.0, retry_max_s=5.0),
    )
    notifier.observe([firing("A")])
    await notifier.deliver()
    assert notifier.next_due() == 30.0


async def test_a_poster_that_raises_is_a_failed_post():
    async def broken(url: str, body: dict) -> PostResult:
        raise RuntimeError("boom")

    clock = ReplayClock(0.0)
    notifier = AlertNotifier([DiscordTarget("http://x/hook")], poster=broken, clock=clock)
    notifier.observe([firing("A")])
    assert await notifier.deliver() == 0
    assert notifier.queued == 1 and notifier.next_due() == 2.0


def test_a_malformed_answer_names_the_field():
    with pytest.raises(AlertSourceError, match=r"data\.alerts\[1\]\.labels\.alertname"):
        parse_alerts(answer(alert("A"), {"state": "firing", "labels": {}}))
    with pytest.raises(AlertSourceError, match=r"data\.alerts is not a list"):
        parse_alerts({"status": "success", "data": {"alerts": None}})
    with pytest.raises(AlertSourceError, match="not a JSON object"):
        parse_alerts([1, 2])
    [only] = parse_alerts(answer(alert("A", instance="x"), alert("B", state="pending")))
    assert only.name == "A" and only.severity == "critical" and only.labels["instance"] == "x"
