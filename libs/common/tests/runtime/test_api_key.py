"""PumpPortal's API key as a trader gives it: from the environment or a secret file,
refused with a clear message when the file is open to other users, empty, holds more
than a key, or when both ways are given; never shown."""

from __future__ import annotations

import io
import logging

import pytest

from pumpflow.common.runtime.logging import MASK, configure_logging, redacted_settings
from pumpflow.common.runtime.settings import PumpPortalKeySettings, SettingsError

KEY = "Kk9aZ3pumpportal-key"


def key_file(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "pumpportal-key"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_secret_file_only_its_owner_and_group_read_gives_the_key(tmp_path, mode):
    settings = PumpPortalKeySettings(pumpportal_api_key_file=key_file(tmp_path, f"{KEY}\n", mode))
    assert settings.api_key() == KEY


@pytest.mark.parametrize(
    ("mode", "what"),
    [
        (0o644, "readable by every user"),
        (0o604, "readable by every user"),
        (0o666, "readable and writable by every user"),
        (0o620, "writable by its group"),
    ],
)
def test_a_secret_file_open_to_other_users_is_refused_saying_how_to_close_it(tmp_path, mode, what):
    path = key_file(tmp_path, f"{KEY}\n", mode)
    settings = PumpPortalKeySettings(pumpportal_api_key_file=path)
    with pytest.raises(SettingsError) as refused:
        settings.api_key()
    said = str(refused.value)
    assert said == (
        f"PUMPPORTAL_API_KEY_FILE: {path} is {what} (mode {mode:04o}): chmod 600 {path} "
        "(640 to share it with a group)"
    )
    assert KEY not in said


@pytest.mark.parametrize("text", ["", "\n", "   \n\t"])
def test_an_empty_secret_file_is_refused_not_taken_for_no_key(tmp_path, text):
    path = key_file(tmp_path, text)
    settings = PumpPortalKeySettings(pumpportal_api_key_file=path)
    with pytest.raises(SettingsError, match=f"PUMPPORTAL_API_KEY_FILE: {path} is empty"):
        settings.api_key()


@pytest.mark.parametrize("given", ["file", "environment"])
def test_a_key_with_whitespace_inside_is_refused_without_showing_it(tmp_path, given):
    text = f"{KEY}\nanother-line-of-it\n"
    if given == "file":
        settings = PumpPortalKeySettings(pumpportal_api_key_file=key_file(tmp_path, text))
        variable = "PUMPPORTAL_API_KEY_FILE"
    else:
        settings = PumpPortalKeySettings(pumpportal_api_key=text)
        variable = "PUMPPORTAL_API_KEY"
    with pytest.raises(SettingsError, match=f"^{variable}: .*whitespace inside") as refused:
        settings.api_key()
    assert KEY not in str(refused.value)


def test_a_key_given_both_ways_is_refused(tmp_path):
    settings = PumpPortalKeySettings(
        pumpportal_api_key="another-key-from-the-env",
        pumpportal_api_key_file=key_file(tmp_path, KEY),
    )
    with pytest.raises(SettingsError) as refused:
        settings.api_key()
    assert str(refused.value) == (
        "PUMPPORTAL_API_KEY and PUMPPORTAL_API_KEY_FILE are both set: give the key one way"
    )


def test_a_key_given_with_blanks_around_it_is_scrubbed_as_it_is_used():
    """An env file's ``PUMPPORTAL_API_KEY= key `` sends ``key``: that is what no log line
    may show."""
    settings = PumpPortalKeySettings(pumpportal_api_key=f"  {KEY} ", service="trading")
    assert settings.api_key() == KEY
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").warning("sent with %s", settings.api_key())
    assert KEY not in stream.getvalue()
    assert f"sent with {MASK}" in stream.getvalue()


def test_the_key_files_path_is_shown_where_the_key_is_not(tmp_path):
    """The path names where the key is, not the key: the settings and a line that names
    the file (a refusal of it) show it."""
    path = key_file(tmp_path, KEY)
    settings = PumpPortalKeySettings(pumpportal_api_key_file=path, service="feed")
    assert redacted_settings(settings)["pumpportal_api_key_file"] == path
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    logging.getLogger("pumpflow.test").warning("read %s: %s", path, settings.api_key())
    assert f"read {path}: {MASK}" in stream.getvalue()
