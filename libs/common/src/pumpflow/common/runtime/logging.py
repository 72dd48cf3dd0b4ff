"""Structured logging: one JSON object (or one text line) per record, secrets redacted.

Every line carries the service and the replica. Settings are only ever logged through
:func:`redacted_settings`, and the formatter also scrubs the configured secret values
from every finished line, so a secret that slips into a message is still not written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, SecretBytes, SecretStr

MASK = "***"
#: setting names whose values are secrets
SECRET_NAME = re.compile(r"(key|secret|password|passwd|token|credential)", re.IGNORECASE)
#: shorter values are not scrubbed from messages: they would mangle ordinary text
_MIN_SCRUB_LENGTH = 6

# attributes every LogRecord has, and uvicorn's copy of its message for a terminal
# (the template again, with colour escapes); anything else came in through ``extra=``
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}
)


#: values never secret, whatever their setting's name: a number or a flag
#: (feed_max_keys_per_message), and a path, which names where a secret is (the key file)
_NEVER_SECRET = (bool, int, float, PurePath)


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact_url(value: str) -> str:
    """Mask the password of a URL/DSN and secret-looking query parameters."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.scheme or not parts.netloc:
        return value
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(name) for name, _ in pairs):
            query = urlencode([(n, MASK if is_secret_name(n) else v) for n, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_value(name: str, value: Any) -> Any:
    """The value of setting ``name`` as it may be shown."""
    if value is None or value == "":
        return value
    if isinstance(value, SecretStr | SecretBytes):
        # masked as every secret is, not as pydantic's asterisks; an empty one is unset
        return MASK if value.get_secret_value() else ""
    if is_secret_name(name) and not isinstance(value, _NEVER_SECRET):
        return MASK
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Mapping):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(name, v) for v in value)
    return value


def redacted_settings(settings: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """Settings as a dict that is safe to log or print."""
    values = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings)
    return {name: redact_value(name, value) for name, value in values.items()}


def _secret_strings(name: str, value: Any) -> Iterable[str]:
    if value is None:
        return
    if isinstance(value, SecretStr | SecretBytes):
        secret = value.get_secret_value()
        yield secret.decode(errors="replace") if isinstance(secret, bytes) else secret
        return
    if isinstance(value, BaseModel):
        for field, inner in value.model_dump().items():
            yield from _secret_strings(field, inner)
        return
    if isinstance(value, Mapping):
        for field, inner in value.items():
            yield from _secret_strings(str(field), inner)
        return
    if not isinstance(value, str):
        if is_secret_name(name) and not isinstance(value, _NEVER_SECRET):
            yield str(value)
        return
    if is_secret_name(name):
        yield value
        return
    try:
        parts = urlsplit(value)
        if parts.password:
            yield parts.password
        for query_name, query_value in parse_qsl(parts.query, keep_blank_values=True):
            if is_secret_name(query_name):
                yield query_value
    except ValueError:
        return


def _all_secrets(values: Mapping[str, Any]) -> dict[str, set[str]]:
    return {name: set(filter(None, _secret_strings(name, value))) for name, value in values.items()}


#: a public word: what the logs print between dots, slashes, colons, quotes and spaces
_WORD = re.compile(r"[\w-]+")


def public_words(settings: BaseModel | Mapping[str, Any]) -> frozenset[str]:
    """Words every log line may carry: the package's and loggers' names, and the words of
    the settings as they are shown (namespace, service, host names, database name)."""
    words = {__name__.partition(".")[0]}
    shown = json.dumps(redacted_settings(settings), default=str)
    for text in [*logging.root.manager.loggerDict, shown]:
        words.update(_WORD.findall(text))
    return frozenset(words)


def _split_secrets(settings: BaseModel | Mapping[str, Any]) -> tuple[set[str], set[str], list[str]]:
    """(secrets to scrub from any text, every secret, names of settings whose secret is a
    public word): scrubbing a public word would mask names on every line and protect
    nothing, since the word is printed anyway."""
    values = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings)
    public = public_words(values)
    anywhere: set[str] = set()
    every: set[str] = set()
    weak: list[str] = []
    secrets = _all_secrets(values)
    # a secret read from a file (a mounted secret) is in no setting's value
    read = getattr(settings, "read_secrets", None)
    for name, secret in (read() if callable(read) else {}).items():
        secrets.setdefault(name, set()).add(secret)
    for name, found in secrets.items():
        every |= found
        anywhere.update(s for s in found if len(s) >= _MIN_SCRUB_LENGTH and s not in public)
        if any(len(s) >= _MIN_SCRUB_LENGTH and s in public for s in found):
            weak.append(name)
    return anywhere, every, weak


def secret_values(settings: BaseModel | Mapping[str, Any]) -> set[str]:
    """The secret strings scrubbed from any text: secret fields, URL passwords and URL
    keys, except short ones and public words (those are scrubbed from URLs only)."""
    return _split_secrets(settings)[0]


class _Scrubber:
    """Masks ``secrets`` wherever they appear, and ``credentials`` where a URL carries
    them as its password (``user:***@host``)."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str], credentials: Iterable[str] = ()):
        def alternatives(values: Iterable[str]) -> str:
            return "|".join(re.escape(s) for s in sorted(set(values), key=len, reverse=True))

        parts = []
        if secrets := alternatives(secrets):
            parts.append(secrets)
        if credentials := alternatives(credentials):
            parts.append(rf"(?<=:)(?:{credentials})(?=@)")
        self._pattern = re.compile("|".join(parts)) if parts else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern is not None else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, replica, extras."""

    def __init__(
        self,
        *,
        service: str,
        replica: str,
        secrets: Iterable[str] = (),
        credentials: Iterable[str] = (),
    ):
        super().__init__()
        self.service = service
        self.replica = replica
        self._scrub = _Scrubber(secrets, credentials)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "replica": self.replica,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRS and not name.startswith("_") and name not in entry:
                entry[name] = MASK if is_secret_name(name) else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return self._scrub(json.dumps(entry, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """``time LEVEL service/replica logger: message key=value ...`` for humans."""

    def __init__(
        self,
        *,
        service: str,
        replica: str,
        secrets: Iterable[str] = (),
        credentials: Iterable[str] = (),
    ):
        super().__init__("%(asctime)s %(levelname)s %(origin)s %(name)s: %(message)s")
        self.origin = f"{service}/{replica}"
        self._scrub = _Scrubber(secrets, credentials)

    def format(self, record: logging.LogRecord) -> str:
        record.origin = self.origin
        line = super().format(record)
        extras = [
            f"{name}={MASK if is_secret_name(name) else value}"
            for name, value in record.__dict__.items()
            if name not in _STANDARD_ATTRS and name != "origin" and not name.startswith("_")
        ]
        if extras:
            line = f"{line} {' '.join(extras)}"
        return self._scrub(line)


class _PumpflowHandler(logging.StreamHandler):
    """Marks the handler this module installed, so reconfiguring replaces it."""


def configure_logging(settings: Any, *, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as JSON lines or text, per settings."""
    level = logging.getLevelName(str(settings.log_level).upper())
    if not isinstance(level, int):
        raise ValueError(f"PUMPFLOW_LOG_LEVEL: unknown logging level {settings.log_level!r}")
    secrets, credentials, weak = _split_secrets(settings)
    formatter_cls = JsonFormatter if settings.log_format == "json" else TextFormatter
    handler = _PumpflowHandler(stream or sys.stderr)
    handler.setFormatter(
        formatter_cls(
            service=settings.service,
            replica=settings.replica,
            secrets=secrets,
            credentials=credentials,
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PumpflowHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn installs its own handlers unless told otherwise; let its records reach ours
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(max(level, logging.WARNING))
    if weak:
        logging.getLogger(__name__).warning(
            "%s: the secret is a word the logs carry anyway (a name or a setting's value), "
            "so it is masked in URLs only; choose one that is not",
            ", ".join(weak),
        )
    return handler
