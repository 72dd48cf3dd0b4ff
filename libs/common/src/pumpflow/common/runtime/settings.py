"""Typed settings from the environment (prefix ``PUMPFLOW_``), frozen once read.

Each service extends :class:`CommonSettings` with its own fields. A bad value fails
at start-up with the variable's name and the reason.

One config file (TOML, named by ``PUMPFLOW_CONFIG_FILE`` or ``pumpflow --config-file``)
can hold the settings of every service: ``[common]`` for all of them, ``[trading]``,
``[exit]``, ... for one, each key a setting's name (``trading_min_score = 0.5``). The
environment overrides the file, and what the code passes overrides both. A key no
setting of its table has is an error naming the file, table and key: a typo never
silently keeps a default. :func:`check_config_file` checks the whole file up front,
values included, and :func:`check_environment` the ``PUMPFLOW_`` variables: one that
names no setting is refused, naming the closest. An empty value
(``PUMPFLOW_EXIT_MAX_HOLD_S=``, as env files write it) unsets a setting that may be
unset, and empties a list or mapping (:func:`unset_if_empty`).
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pumpflow.common.runtime.arguments import (
    AMQP_SCHEMES,
    NAMESPACE_PATTERN,
    POSTGRES_SCHEMES,
    REDIS_SCHEMES,
    server_url,
)
from pumpflow.common.runtime.logging import redact_value
from pumpflow.common.timeouts import POSTGRES_COMMAND_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S

#: the environment variable naming the config file
CONFIG_FILE_VARIABLE = "PUMPFLOW_CONFIG_FILE"
#: how long an operator's shutdown request is remembered as applied, and how old one may
#: be and still apply: a request comes again as ``pumpflow stop`` retries it under its id
#: (within its wait, minutes), as the broker redelivers it unacknowledged (at once, or as
#: its consumer comes back from an outage of hours) and as an operator moves its dead
#: letter back (within days); a week is past all of them, and one older is refused
SHUTDOWN_REQUESTS_KEPT_S = 7 * 86_400.0
#: seconds in a day
DAY_S = 86_400.0
#: the shortest keep of stored token events (the feed's, ``pumpflow prune``'s):
#: consumers rebuild a traded mint's window from them, and a feed's start restores the
#: seq of each mint of the last hours from them
MIN_KEEP_DAYS = 1.0


def keep_bound(now: float, keep_s: float) -> float:
    """The time before which a keep of ``keep_s`` seconds deletes the stored events at
    ``now``: the epoch for a keep reaching past 1970, which keeps every event (no date
    says a bound before the year 1)."""
    return max(0.0, now - keep_s)


#: the config file's table read by every service
COMMON_TABLE = "common"
#: the prefix of every setting's environment variable
PREFIX = "PUMPFLOW_"
#: the services of a deployment, each the owner of the settings named after it
#: (``PUMPFLOW_EXIT_DEADLINE_S`` is the exit service's): one environment may serve them
#: all (compose's), while a process (an image) holds one service's settings
SERVICES = ("feed", "features", "activity", "model", "trading", "exit")
#: ``PUMPFLOW_`` variables the project reads that are no setting: the config file's, and
#: the test suite's (its servers, CI's tools switch, the fault suite's figures), which a
#: shell that runs both may carry
OWN_VARIABLES = frozenset(
    {
        CONFIG_FILE_VARIABLE,
        "PUMPFLOW_TEST_AMQP_URL",
        "PUMPFLOW_TEST_REDIS_URL",
        "PUMPFLOW_TEST_POSTGRES_DSN",
        "PUMPFLOW_REQUIRE_TOOLS",
        "PUMPFLOW_FAULT_REPORT",
    }
)


class SettingsError(ValueError):
    """A setting in the environment or the config file is missing or invalid."""


def setting_text(value: Any) -> str:
    """A setting's value as ``--config`` and the environment take it (``false``, a list
    as JSON, empty for none), not as Python prints it (``False``)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def read_toml_tables(path: str | Path, named: str, *, hint: str = "") -> dict[str, dict[str, Any]]:
    """A TOML file's tables; SettingsError, naming the file as ``named``, when it cannot
    be read or holds anything but tables (``hint`` says where settings go)."""
    try:
        with open(path, "rb") as handle:
            tables = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"{named}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{named}: not TOML ({exc})") from None
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise SettingsError(f"{named}: {name!r} is not a table{hint}")
    return tables


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The config file's tables; SettingsError when it cannot be read or is not tables."""
    return read_toml_tables(
        path,
        f"config file {path}",
        hint=f"; put settings under [{COMMON_TABLE}] or a service's table",
    )


def check_config_file(path: str | Path, services: dict[str, type[BaseSettings]]) -> None:
    """Check every table, key and value of the file against ``services``' settings classes.

    Each value is checked against its field's type and constraints on its own, as a
    flag or the environment overriding it would keep it from ever being validated: a
    typo'd value must not pass for one that applies. Rules between fields stay with
    loading, where the values that apply are known.
    """
    tables = read_config_file(path)
    known = {COMMON_TABLE: CommonSettings, **services}
    problems = []
    for name, table in tables.items():
        settings_cls = known.get(name)
        if settings_cls is None:
            raise SettingsError(
                f"config file {path}: no service named [{name}] "
                f"(tables: {', '.join(sorted(known))})"
            )
        _check_keys(path, name, table, settings_cls, known)
        problems += _bad_values(name, table, settings_cls)
    if problems:
        raise SettingsError(f"config file {path}: {'; '.join(problems)}")


def check_environment(
    settings: Mapping[str, type[CommonSettings]],
    *,
    others: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> None:
    """Refuse every ``PUMPFLOW_`` variable of ``environ`` (the process's by default) that
    is no setting of ``settings`` (by service), nor one of ``others`` or
    :data:`OWN_VARIABLES`, naming the known variable closest to each.

    A ``PUMPFLOW_<SERVICE>_`` variable of a service of :data:`SERVICES` that ``settings``
    lacks is left to that service's own process, which refuses it if it names none of its
    settings: an environment may serve every service, a process hold one. Names are
    compared in capitals, as the settings read them.
    """
    environ = os.environ if environ is None else environ
    known = {name.upper() for name in [*OWN_VARIABLES, *others]}
    for settings_cls in (CommonSettings, *settings.values()):
        known.update(name.upper() for name in settings_cls.variables().values())
    elsewhere = tuple(f"{PREFIX}{name.upper()}_" for name in SERVICES if name not in settings)
    unknown = [
        name
        for name in sorted(environ)
        if name.upper().startswith(PREFIX)
        and name.upper() not in known
        and not name.upper().startswith(elsewhere)
    ]
    if not unknown:
        return
    ours = sorted(k.removeprefix(PREFIX) for k in known if k.startswith(PREFIX))

    def named(name: str) -> str:
        close = difflib.get_close_matches(name.upper().removeprefix(PREFIX), ours, n=1)
        return f"{name} (did you mean {PREFIX}{close[0]}?)" if close else name

    raise SettingsError(
        f"unknown variable{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(named(name) for name in unknown)}: every {PREFIX} variable names a "
        "setting (pumpflow settings <service> lists them)"
    )


def _check_keys(
    path, name: str, table: dict[str, Any], settings_cls, known: Mapping[str, Any] | None = None
) -> None:
    """Refuse a key of table ``name`` that is no setting of ``settings_cls``, naming the
    tables of ``known`` (name: settings class) that have it, else the closest setting."""
    fields = settings_cls.model_fields
    unknown = sorted(set(table) - set(fields))
    if not unknown:
        return

    def named(key: str) -> str:
        owners = [f"[{o}]" for o, cls in (known or {}).items() if key in cls.model_fields]
        if owners:
            return f"{key} (a setting of {' and '.join(owners)})"
        close = difflib.get_close_matches(key, list(fields), n=1)
        return f"{key} (did you mean {close[0]}?)" if close else key

    raise SettingsError(
        f"config file {path}: [{name}] has no setting named {', '.join(map(named, unknown))}"
    )


def _bad_values(name: str, table: dict[str, Any], settings_cls) -> list[str]:
    """``[table] key: reason`` of each value its field refuses (the value itself is not
    shown: it may be a secret)."""
    problems = []
    for key, value in table.items():
        field = settings_cls.model_fields[key]
        annotation = (
            Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        )
        try:
            TypeAdapter(annotation).validate_python(unset_if_empty(field, value))
        except ValidationError as exc:
            # each error where it is in a list or mapping (``[1][1]``), as the environment's
            problems.extend(
                f"[{name}] {key}{_within(('', *err['loc']))}: {err['msg']}" for err in exc.errors()
            )
        except ValueError as exc:  # text that is no JSON, of a list or mapping
            problems.append(f"[{name}] {key}: {exc}")
    return problems


_COLLECTIONS = (dict, list, tuple, set, frozenset)


def unset_if_empty(field: FieldInfo, value: Any) -> Any:
    """``value`` of the setting ``field`` as the setting reads it. Empty (an env file's
    ``PUMPFLOW_EXIT_MAX_HOLD_S=``): None for a setting that may be None, which is what
    its description says unset or empty means (a rule off, no wait, every consumer
    group), and an empty one for a list or mapping. A list or mapping given as text is
    JSON (ValueError if it is not)."""
    if not isinstance(value, str):
        return value
    annotation = field.annotation
    collection = typing.get_origin(annotation) or annotation
    collection = collection if collection in _COLLECTIONS else None
    if not value.strip():
        if type(None) in typing.get_args(annotation):
            return None
        if collection is not None:
            return collection()
        if annotation in (int, float, bool):
            # read as text, an empty one would be refused as no number or no switch
            default = field.default
            default = f" (default {setting_text(default)})" if default is not None else ""
            raise ValueError(
                f"empty, and it cannot be unset{default}: give a value, or leave it out for "
                "the default"
            )
        return value
    if collection is None:
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None


def _within(loc: tuple) -> str:
    """Where in a list or mapping setting's value an error is (``[0][1]``), if it is."""
    return "".join(f"[{part}]" for part in loc[1:])


def _known_groups(value: str | None) -> str | None:
    """``consumer_groups`` once each of its names is a consumer group (a typo would only
    fail once a replica connected, declaring them)."""
    if value is not None:
        from pumpflow.common.runtime.topology import groups_of

        groups_of(name.strip() for name in value.split(",") if name.strip())
    return value


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The config file's ``[common]`` table, then the service's own table over it."""

    def __init__(self, settings_cls: type[BaseSettings], path: str, service: str | None):
        super().__init__(settings_cls)
        tables = read_config_file(path)
        common = tables.get(COMMON_TABLE, {})
        _check_keys(path, COMMON_TABLE, common, CommonSettings)
        own = tables.get(service, {}) if service and service != COMMON_TABLE else {}
        _check_keys(path, service, own, settings_cls)
        self.values = {**common, **own}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class CommonSettings(BaseSettings):
    """Settings every service reads. Environment: ``PUMPFLOW_<NAME>``."""

    # lists and mappings are read as JSON by unset_if_empty, where an empty one is empty
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, extra="ignore", enable_decoding=False
    )

    service: str = Field("pumpflow", description="service name; first part of event sources")
    replica: str = Field(
        default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}",
        description="replica id, unique per process",
    )
    transport: Literal["memory", "rabbitmq"] = Field("rabbitmq", description="bus transport")
    amqp_url: Annotated[str, AfterValidator(lambda url: server_url(url, AMQP_SCHEMES))] = Field(
        "amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL"
    )
    redis_url: Annotated[str, AfterValidator(lambda url: server_url(url, REDIS_SCHEMES))] = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL"
    )
    #: Redis answers in well under a millisecond and the project's commands never block
    #: on the server (no BLPOP, no XREAD BLOCK); its own stalls (a fork for a snapshot,
    #: the deletion of a big key) last a fraction of a second. 5 s (redis-py 8's own
    #: default, none before) is far beyond those, so only a Redis that does not answer
    #: (a frozen host, a network lost without a reset) meets it, and the work it held
    #: waits for Redis, named in /readyz, within seconds rather than for ever.
    redis_socket_timeout_s: float = Field(
        REDIS_SOCKET_TIMEOUT_S,
        gt=0,
        description="longest a Redis read, write or connection waits before Redis counts "
        "as away and the work waits for it",
    )
    postgres_dsn: Annotated[str, AfterValidator(lambda dsn: server_url(dsn, POSTGRES_SCHEMES))] = (
        Field("postgresql://postgres@127.0.0.1:5432/test", description="Postgres")
    )
    #: A service's commands take milliseconds; the longest one waits on another's is a
    #: row held by a holding transaction, which the server ends once idle 10 s
    #: (``db.transactions.HOLDING_IDLE_LIMIT_S``). 30 s is thrice that, so only a
    #: Postgres that does not answer (a frozen host, a network lost without a reset)
    #: meets it, and the work it held waits for Postgres, named in /readyz, within half
    #: a minute rather than for ever. What may rightly run longer bounds itself: the
    #: migrations run unbounded, a replay's fetches by ``REPLAY_FETCH_TIMEOUT_S``.
    postgres_command_timeout_s: float = Field(
        POSTGRES_COMMAND_TIMEOUT_S,
        gt=0,
        description="longest a Postgres command (or a new connection) waits for an answer "
        "before Postgres counts as away and the work waits for it",
    )
    namespace: str = Field(
        "pumpflow",
        pattern=NAMESPACE_PATTERN,
        description="prefix of exchanges, queues, Redis keys and the Postgres schema",
    )
    partitions: int = Field(16, ge=1, le=256, description="partitions of keyed events")
    prefetch: int = Field(256, ge=1, description="unacked messages per partition consumer")
    http_host: str = Field("127.0.0.1", description="health and metrics bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="health/metrics port (0: off)")
    api_token: str | None = Field(None, description="bearer token for mutating endpoints")
    log_level: str = Field(
        "INFO",
        # checked with the other values (and the config file's), not first where it applies
        pattern=r"(?i)^(critical|fatal|error|warn|warning|info|debug|notset)$",
        description="logging level",
    )
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    event_log: Literal["none", "sampled", "all"] = Field("none", description="event audit log")
    event_log_sample_rate: float = Field(0.01, ge=0.0, le=1.0, description="share logged")
    drain_timeout_s: float = Field(10.0, gt=0, description="SIGTERM: time to drain handlers")
    shutdown_timeout_s: float = Field(
        25.0,
        gt=0,
        # below compose's stop_grace_period (30 s): the process ends, saying what it cut
        # short, before its supervisor kills it
        description="SIGTERM: time the whole shutdown has (drain, stop, closes)",
    )
    dependency_retry_max_s: float = Field(
        5.0, gt=0, description="start-up: longest pause between tries to reach a dependency"
    )
    dependency_wait_s: float | None = Field(
        None,
        gt=0,
        description="start-up: exit 1 when RabbitMQ, Redis or Postgres is still unreachable "
        "after this long (unset: wait for it, serving /readyz as not ready)",
    )
    balance_partitions: bool = Field(
        True,
        description="replicas share partitions by rendezvous hashing over live replicas "
        "(rabbitmq); off: every replica consumes all, single-active-consumer picks one",
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="how often a replica heartbeats in Redis and rebalances"
    )
    heartbeat_ttl_s: float = Field(
        3.0, gt=0, description="a replica silent this long is dead; others take its partitions"
    )
    shutdown_requests_kept_s: float = Field(
        SHUTDOWN_REQUESTS_KEPT_S,
        gt=0,
        description="trading and exit: seconds an operator's shutdown request is "
        "remembered as applied (a copy then applies nothing again), and the age past "
        "which one is refused as too old to apply (whether it was applied is not known)",
    )
    consumer_groups: Annotated[str | None, AfterValidator(_known_groups)] = Field(
        None,
        description="consumer groups the deployment runs, comma-separated (unset: all): "
        "their queues are declared as each process connects, so nothing published "
        "before a group starts is lost; a declared group must run, or its queues grow",
    )

    replay_clock_start: float | None = Field(
        None,
        gt=0,
        description="run on a replay clock from this epoch time instead of the wall: time "
        "moves only when POST /clock says (lock-step replays, parity tests); leases then "
        "stay in the process, so one replica per service",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get(CONFIG_FILE_VARIABLE)
        if not path:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        given = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        service = (
            given.get("service")
            or os.environ.get("PUMPFLOW_SERVICE")
            or settings_cls.model_fields["service"].default
        )
        config = _ConfigFileSource(settings_cls, path, service)
        return init_settings, env_settings, dotenv_settings, config, file_secret_settings

    def start_line(self) -> str | None:
        """What the service says of these settings as it starts, for ``pumpflow
        settings`` to end with (None: nothing beyond them)."""
        return None

    def __repr_args__(self):
        # a repr lands in tracebacks and debug lines: shown as the log shows settings
        for name, value in super().__repr_args__():
            yield name, redact_value(name, value) if name is not None else value

    @field_validator("*", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: Any, info: ValidationInfo) -> Any:
        return unset_if_empty(cls.model_fields[info.field_name], value)

    @field_validator("heartbeat_ttl_s")
    @classmethod
    def _ttl_above_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("heartbeat_interval_s")
        if interval is not None and value <= interval:
            raise ValueError(f"must be above heartbeat_interval_s ({interval})")
        return value

    @property
    def consumer_group_names(self) -> list[str] | None:
        """``consumer_groups`` as names (None: every group)."""
        if self.consumer_groups is None:
            return None
        return [name.strip() for name in self.consumer_groups.split(",") if name.strip()]

    @property
    def source(self) -> str:
        """Event source of this replica: ``<service>/<replica>``."""
        return f"{self.service}/{self.replica}"

    def shutdown_too_old(self, requested_at: float, now: float) -> bool:
        """Whether a shutdown requested at ``requested_at`` is older than a request is
        remembered (:attr:`shutdown_requests_kept_s`): applied or not, it must not apply
        now, as nothing tells a copy of one applied and forgotten."""
        return requested_at < now - self.shutdown_requests_kept_s

    @classmethod
    def load(cls, **overrides):
        """Read the config file and the environment; raise SettingsError naming each bad
        variable (or key of the config file)."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls._origin(err['loc'], overrides)}{_within(err['loc'])}: {err['msg']}"
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None

    @classmethod
    def _origin(cls, loc: tuple, overrides: dict[str, Any]) -> str:
        """Where a bad value came from: its variable, or its key in the config file."""
        variable = cls.variable_name(loc)
        path = os.environ.get(CONFIG_FILE_VARIABLE)
        name = str(loc[0]) if loc else ""
        if not path or variable in os.environ or name in overrides:
            return variable
        service = overrides.get("service") or cls.model_fields["service"].default
        for table in (service, COMMON_TABLE):
            if name in read_config_file(path).get(table, {}):
                return f"{name} in [{table}] of {path}"
        return variable

    @classmethod
    def load_with_defaults(cls, defaults: Mapping[str, Any], **overrides):
        """:meth:`load`, with ``defaults`` in place of the settings' own defaults: a
        setting the environment or the config file gives keeps its value."""
        given = cls.load(**overrides).model_fields_set
        return cls.load(**{k: v for k, v in defaults.items() if k not in given}, **overrides)

    @classmethod
    def variables(cls) -> dict[str, str]:
        """The environment variable of each setting, by the setting's name: an alias in
        capitals (``PUMPPORTAL_WS_URL``, read without the prefix), else the prefixed
        name."""
        prefix = cls.model_config.get("env_prefix", "")
        found = {}
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            found[name] = next(
                (c for c in choices if isinstance(c, str) and c.isupper()),
                f"{prefix}{name.upper()}",
            )
        return found

    @classmethod
    def variable_name(cls, loc: tuple) -> str:
        """The environment variable behind an error location (aliases are used as is)."""
        name = str(loc[0]) if loc else ""
        if name.isupper():  # an alias such as PUMPPORTAL_WS_URL, read without the prefix
            return name
        prefix = cls.model_config.get("env_prefix", "")
        return f"{prefix}{name.upper()}"


class PumpPortalKeySettings(CommonSettings):
    """Settings of a service that holds PumpPortal's API key (the feed, live trading).

    The key keeps PumpPortal's own environment names (``PUMPPORTAL_API_KEY``, or
    ``PUMPPORTAL_API_KEY_FILE`` for a mounted secret). It is a SecretStr: it never
    appears in a repr or a log.
    """

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, extra="ignore", populate_by_name=True
    )

    pumpportal_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("PUMPPORTAL_API_KEY", "pumpportal_api_key"),
        description="PumpPortal API key (trade subscriptions, the trade API)",
    )
    pumpportal_api_key_file: Path | None = Field(
        None,
        validation_alias=AliasChoices("PUMPPORTAL_API_KEY_FILE", "pumpportal_api_key_file"),
        description="file holding the API key (a mounted secret)",
    )

    def key_given(self) -> bool:
        """Whether a key is given, by the environment or a secret file (not read here)."""
        return self.pumpportal_api_key is not None or self.pumpportal_api_key_file is not None

    def read_secrets(self) -> dict[str, str]:
        """The key read from the secret file, for the log scrubber to mask."""
        if self.pumpportal_api_key is not None or self.pumpportal_api_key_file is None:
            return {}
        try:
            key = self.api_key()
        except SettingsError:
            return {}
        return {"pumpportal_api_key_file": key} if key else {}

    @field_validator("pumpportal_api_key")
    @classmethod
    def _strip_key(cls, value: SecretStr | None) -> SecretStr | None:
        # the key sent is the one without blanks around it: the one the logs must mask
        return None if value is None else SecretStr(value.get_secret_value().strip())

    def no_key(self) -> str:
        """What to do about no key given: a blank one unsets it, as any blank setting."""
        if os.environ.get("PUMPPORTAL_API_KEY", "") and self.pumpportal_api_key is None:
            return "PUMPPORTAL_API_KEY is set but blank: give the key"
        return "set PUMPPORTAL_API_KEY or PUMPPORTAL_API_KEY_FILE"

    def api_key(self) -> str | None:
        """The key from the environment or the secret file; never log it.

        Refused (SettingsError): both given, a key with whitespace inside it (two lines
        of a file), an empty secret file, one not UTF-8 text, and one other users may
        read or change."""
        given, path = self.pumpportal_api_key, self.pumpportal_api_key_file
        if given is not None and path is not None:
            raise SettingsError(
                "PUMPPORTAL_API_KEY and PUMPPORTAL_API_KEY_FILE are both set: give the key one way"
            )
        if given is not None:
            return _one_key("PUMPPORTAL_API_KEY", given.get_secret_value())
        if path is None:
            return None
        try:
            _check_private(path)
            text = path.read_text("utf-8")
        except OSError as exc:
            raise SettingsError(
                f"PUMPPORTAL_API_KEY_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            # the error would quote the file's bytes: a key's, or a wallet's private one
            raise SettingsError(
                f"PUMPPORTAL_API_KEY_FILE: {path} is not text (UTF-8): give the key on one line"
            ) from None
        key = _one_key("PUMPPORTAL_API_KEY_FILE", text)
        if key is None:
            raise SettingsError(f"PUMPPORTAL_API_KEY_FILE: {path} is empty")
        return key


def _one_key(variable: str, text: str) -> str | None:
    """The key ``text`` holds (None when blank), refused when whitespace splits it."""
    key = text.strip()
    if any(c.isspace() for c in key):
        raise SettingsError(
            f"{variable}: the key has whitespace inside it: give one key, on one line"
        )
    return key or None


def _check_private(path: Path) -> None:
    """Refuse a secret file that users other than its owner and group may read, or that
    anyone but its owner may change (a changed key would trade from another wallet)."""
    mode = path.stat().st_mode & 0o777
    others = [what for bit, what in ((0o004, "readable"), (0o002, "writable")) if mode & bit]
    if others:
        what = f"{' and '.join(others)} by every user"
    elif mode & 0o020:
        what = "writable by its group"
    else:
        return
    raise SettingsError(
        f"PUMPPORTAL_API_KEY_FILE: {path} is {what} (mode {mode:04o}): chmod 600 {path} "
        "(640 to share it with a group)"
    )
