from __future__ import annotations

import io
import json
import logging

import pytest
from pydantic import Field, SecretStr

from pumpflow.common.runtime.logging import (
    MASK,
    configure_logging,
    redact_url,
    redacted_settings,
    secret_values,
)
from pumpflow.common.runtime.settings import CommonSettings, PumpPortalKeySettings


class WalletSettings(CommonSettings):
    pumpportal_api_key: str | None = Field(None, description="PumpPortal key")
    wallet_secret: str | None = Field(None, description="wallet secret")
    db_password: str | None = Field(None, description="a password")
    pumpportal_ws_url: str = Field("wss://pumpportal.fun/api/data", description="feed URL")


@pytest.fixture
def settings():
    return WalletSettings(
        service="feed",
        replica="r1",
        api_token="tok-SECRET-1",
        pumpportal_api_key="KEY-SECRET-2",
        wallet_secret="WALLET-SECRET-3",
        db_password="PW-SECRET-4",
        postgres_dsn="postgresql://app:DSN-SECRET-5@db:5432/pumpflow",
        amqp_url="amqp://guest:AMQP-SECRET-6@rabbit:5672/",
        pumpportal_ws_url="wss://pumpportal.fun/api/data?api-key=URL-SECRET-7&x=1",
    )


SECRETS = [f"SECRET-{i}" for i in range(1, 8)]


def test_redacted_settings_masks_every_secret_and_keeps_the_rest(settings):
    shown = redacted_settings(settings)
    text = json.dumps(shown)
    for secret in SECRETS:
        assert secret not in text
    assert shown["api_token"] == MASK
    assert shown["pumpportal_api_key"] == MASK
    assert shown["wallet_secret"] == MASK
    assert shown["db_password"] == MASK
    assert shown["postgres_dsn"] == f"postgresql://app:{MASK}@db:5432/pumpflow"
    assert shown["amqp_url"] == f"amqp://guest:{MASK}@rabbit:5672/"
    assert shown["pumpportal_ws_url"] == f"wss://pumpportal.fun/api/data?api-key={MASK}&x=1"
    assert shown["service"] == "feed"
    assert shown["partitions"] == 16
    assert shown["redis_url"] == "redis://127.0.0.1:6379/0"


def test_secret_str_values_are_scrubbed_too():
    class Keyed(CommonSettings):
        pumpportal_api_key: SecretStr | None = None

    settings = Keyed(pumpportal_api_key="SECRETSTR-VALUE-8", service="feed")
    assert "SECRETSTR-VALUE-8" in secret_values(settings)
    assert redacted_settings(settings)["pumpportal_api_key"] == MASK
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").info(
        "key is %s", settings.pumpportal_api_key.get_secret_value()
    )
    assert "SECRETSTR-VALUE-8" not in stream.getvalue()


def test_a_key_read_from_its_secret_file_is_scrubbed(tmp_path):
    secret = tmp_path / "pumpportal-key"
    secret.write_text("FILEKEY-VALUE-9\n")
    secret.chmod(0o600)
    settings = PumpPortalKeySettings(pumpportal_api_key_file=secret, service="trading")
    assert settings.api_key() == "FILEKEY-VALUE-9"
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").warning("answer: %s", settings.api_key())
    assert "FILEKEY-VALUE-9" not in stream.getvalue()
    assert f"answer: {MASK}" in stream.getvalue()


def test_unset_secrets_stay_visibly_unset():
    shown = redacted_settings(CommonSettings(api_token=None))
    assert shown["api_token"] is None


def test_redact_url_leaves_urls_without_credentials_alone():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("not a url") == "not a url"
    assert (
        redact_url("postgresql://postgres@127.0.0.1/test") == "postgresql://postgres@127.0.0.1/test"
    )


def test_secret_values_finds_fields_and_url_passwords(settings):
    found = secret_values(settings)
    assert {"tok-SECRET-1", "DSN-SECRET-5", "AMQP-SECRET-6", "URL-SECRET-7"} <= found
    # the default guest password is short and public; it is not scrubbed from text
    assert "guest" not in secret_values(CommonSettings())


def test_json_lines_carry_service_replica_and_extras(settings):
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").info("started %s", "ok", extra={"partitions": 4})
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["message"] == "started ok"
    assert line["service"] == "feed"
    assert line["replica"] == "r1"
    assert line["level"] == "INFO"
    assert line["logger"] == "pumpflow.test"
    assert line["partitions"] == 4
    assert isinstance(line["time"], float)


def test_secrets_never_reach_the_log_even_by_mistake(settings):
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    log = logging.getLogger("pumpflow.test")
    log.info("settings", extra={"settings": redacted_settings(settings)})
    log.warning("oops, raw settings: %s", settings.model_dump())
    log.info("a field", extra={"api_key": "whatever-value"})
    try:
        raise RuntimeError(f"connect failed to {settings.postgres_dsn}")
    except RuntimeError:
        log.exception("failure")
    output = stream.getvalue()
    assert output.count("\n") == 4
    for secret in SECRETS:
        assert secret not in output
    assert "whatever-value" not in output
    assert "connect failed" in output


def test_text_format(settings):
    settings = settings.model_copy(update={"log_format": "text", "log_level": "debug"})
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").debug("token %s", settings.api_token, extra={"n": 3})
    line = stream.getvalue().strip()
    assert " DEBUG feed/r1 pumpflow.test: token *** n=3" in line
    assert "SECRET" not in line


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_uvicorns_colour_template_is_no_field_of_the_line(settings, log_format):
    """uvicorn logs its start with ``extra={"color_message": ...}``: the unformatted
    message again with terminal escapes, shown as a field of every service's start."""
    settings = settings.model_copy(update={"log_format": log_format})
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    # a logger of the test's: uvicorn's own may be left disabled by another test
    logging.getLogger("pumpflow.test").info(
        "Started server process [%d]", 42, extra={"color_message": "Started [\x1b[36m%d\x1b[0m]"}
    )
    line = stream.getvalue()
    assert "Started server process [42]" in line
    assert "color_message" not in line and "36m" not in line


def test_reconfiguring_replaces_the_handler(settings):
    stream1, stream2 = io.StringIO(), io.StringIO()
    configure_logging(settings, stream=stream1)
    configure_logging(settings, stream=stream2)
    logging.getLogger("pumpflow.test").warning("once")
    assert stream1.getvalue() == ""
    assert len(stream2.getvalue().splitlines()) == 1


def test_bad_level_names_the_variable(settings):
    with pytest.raises(ValueError, match="PUMPFLOW_LOG_LEVEL"):
        configure_logging(settings.model_copy(update={"log_level": "LOUD"}))


def test_a_secret_that_is_a_public_word_is_masked_in_urls_only():
    # compose's default: the database password is the namespace and the database name
    dsn = "postgresql://postgres:pumpflow@postgres:5432/pumpflow"
    settings = CommonSettings(service="feed", replica="r1", postgres_dsn=dsn)
    assert "pumpflow" not in secret_values(settings)
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.feed.service").info(
        "connecting to %s", dsn, extra={"namespace": settings.namespace}
    )
    warning, line = (json.loads(text) for text in stream.getvalue().splitlines()[-2:])
    assert warning["level"] == "WARNING"
    assert "postgres_dsn" in warning["message"]
    assert line["logger"] == "pumpflow.feed.service"
    assert line["namespace"] == "pumpflow"
    assert line["message"] == f"connecting to postgresql://postgres:{MASK}@postgres:5432/pumpflow"


def test_a_strong_secret_is_masked_everywhere_without_a_warning(settings):
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").info("password DSN-SECRET-5 and key URL-SECRET-7")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == f"password {MASK} and key {MASK}"
