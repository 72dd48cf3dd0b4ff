"""FeedService settings and HTTP route."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import WallClock
from pumpflow.common.runtime.runner import run_service
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings


def test_settings_read_pumpportal_names_and_hide_the_key(monkeypatch):
    monkeypatch.setenv("PUMPPORTAL_WS_URL", "ws://127.0.0.1:9999/api/data")
    monkeypatch.setenv("PUMPPORTAL_API_KEY", "hush")
    monkeypatch.setenv("PUMPFLOW_FEED_PING_INTERVAL_S", "5")
    settings = FeedSettings.load()
    assert settings.service == "feed"
    assert settings.pumpportal_ws_url == "ws://127.0.0.1:9999/api/data"
    assert settings.feed_ping_interval_s == 5.0
    assert settings.api_key() == "hush"
    assert "hush" not in repr(settings) and "hush" not in str(settings.model_dump())
    socket = settings.socket_config()  # the key reaches the socket, never a repr
    assert socket.api_key == "hush" and "hush" not in repr(socket)


def test_the_refused_re_test_is_off_at_0_or_at_least_a_minute_apart(monkeypatch):
    """Each re-test is a new connection: a period of seconds (a typo for minutes) would
    reconnect hundreds of times an hour, so it is refused, as the variable names."""
    assert FeedSettings().socket_config().refused_retest_s == 300.0
    monkeypatch.setenv("PUMPFLOW_FEED_REFUSED_RETEST_S", "0")
    assert FeedSettings.load().socket_config().refused_retest_s == 0.0
    monkeypatch.setenv("PUMPFLOW_FEED_REFUSED_RETEST_S", "60")
    assert FeedSettings.load().feed_refused_retest_s == 60.0
    for refused in ("5", "-1"):
        monkeypatch.setenv("PUMPFLOW_FEED_REFUSED_RETEST_S", refused)
        with pytest.raises(SettingsError, match="PUMPFLOW_FEED_REFUSED_RETEST_S"):
            FeedSettings.load()


def test_api_key_from_a_secret_file(monkeypatch, tmp_path):
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    monkeypatch.setenv("PUMPPORTAL_API_KEY_FILE", str(secret))
    assert FeedSettings.load().api_key() == "from-file"
    monkeypatch.setenv("PUMPPORTAL_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="PUMPPORTAL_API_KEY_FILE"):
        FeedSettings.load().api_key()


def test_serving_the_feed_with_a_key_file_every_user_reads_is_one_line_and_exit_2(
    monkeypatch, tmp_path, capsys
):
    """The key file is refused as a setting is, before anything connects: no traceback,
    and the line names the file (its path is no secret)."""
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    monkeypatch.setenv("PUMPPORTAL_API_KEY_FILE", str(secret))
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", "0")
    assert asyncio.run(run_service(FeedService)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"pumpflow feed: PUMPPORTAL_API_KEY_FILE: {secret} is readable by every user "
        f"(mode 0644): chmod 600 {secret} (640 to share it with a group)"
    )


def test_bad_settings_fail_with_the_variable_name(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_FEED_MAX_KEYS_PER_MESSAGE", "6000")
    with pytest.raises(SettingsError, match="FEED_MAX_KEYS_PER_MESSAGE"):
        FeedSettings.load()


def test_a_bad_pumpportal_variable_is_named_as_it_is_set(monkeypatch):
    monkeypatch.setenv("PUMPPORTAL_WS_URL", "http://not-a-socket")
    with pytest.raises(SettingsError) as raised:
        FeedSettings.load()
    assert "PUMPPORTAL_WS_URL:" in str(raised.value)
    assert "PUMPFLOW_PUMPPORTAL" not in str(raised.value)


async def test_subscriptions_route_and_status_without_recording():
    # nothing listens on port 9: the service starts anyway and reports not ready
    settings = FeedSettings(pumpportal_ws_url="ws://127.0.0.1:9/api/data", feed_record=False,
                            transport="memory", replica="t")  # fmt: skip
    bus = InMemoryBus(partitions=2, synchronous=True, source=settings.source)
    await bus.start()
    service = FeedService(settings)
    assert service.needs_db is False
    await service.start(ServiceContext(settings=settings, bus=bus, clock=WallClock()))
    try:
        await service.manager.subscribe_to_token(["B", "A"])
        app = FastAPI()
        app.include_router(service.router())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://feed") as client:
            body = (await client.get("/subscriptions")).json()
        assert body == {"connected": False, "count": 2, "pending_messages": 2, "accounts": [],
                        "trade_stream": None, "mints": ["A", "B"]}  # fmt: skip
        status = await service.status()
        assert status["ready"] is False and status["active_subscriptions"] == 2
    finally:
        await service.stop()
        await bus.close()


def test_the_record_keep_is_days_or_zero_for_ever_and_outlasts_the_seq_restore(monkeypatch):
    assert FeedSettings.load().feed_record_keep_days == 0.0  # kept for ever unless asked
    monkeypatch.setenv("PUMPFLOW_FEED_RECORD_KEEP_DAYS", "7")
    assert FeedSettings.load().feed_record_keep_days == 7.0
    monkeypatch.setenv("PUMPFLOW_FEED_RECORD_KEEP_DAYS", "30")
    assert FeedSettings.load().feed_record_keep_days == 30.0
    # as pumpflow prune --keep-days refuses it: a keep of every event is 0
    for refused in ("-1", "0.5", "never", "inf", "1e400"):
        monkeypatch.setenv("PUMPFLOW_FEED_RECORD_KEEP_DAYS", refused)
        with pytest.raises(SettingsError, match="FEED_RECORD_KEEP_DAYS"):
            FeedSettings.load()
    # a mint active within the seq restore window keeps the events its seq is read from
    monkeypatch.setenv("PUMPFLOW_FEED_RECORD_KEEP_DAYS", "2")
    monkeypatch.setenv("PUMPFLOW_FEED_SEQ_RESTORE_WINDOW_S", str(3 * 86_400))
    with pytest.raises(SettingsError, match=r"FEED_RECORD_KEEP_DAYS.*seq_restore_window"):
        FeedSettings.load()
    monkeypatch.setenv("PUMPFLOW_FEED_RECORD_PRUNE_BATCH", "0")
    with pytest.raises(SettingsError, match="FEED_RECORD_PRUNE_BATCH"):
        FeedSettings.load()
