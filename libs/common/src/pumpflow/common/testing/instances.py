"""Servers of a test's own: RabbitMQ, Redis and PostgreSQL on free ports, to stop and restart.

A test that stops, restarts, pauses or kills a server must never touch the machine's
shared ones; it starts its own here. Each instance keeps its port and data directory
across restarts, so clients reconnect to the same address and durable data survives
where the server keeps it (RabbitMQ's durable queues and persistent messages, Postgres
always, Redis only with ``persistent=True``: the machine's Redis keeps nothing on disk,
and neither does an instance here by default).

The methods block (a RabbitMQ boot takes several seconds): from async code call them
through ``asyncio.to_thread`` so the event loop, and the clients under test, keep running.

    with RedisInstance() as redis:
        client = Redis.from_url(redis.url)
        ...
        redis.restart()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Self

from pumpflow.common.testing.servers import free_port

#: how long a server may take to answer after it was started
START_TIMEOUT_S = 90.0
#: how long a graceful stop may take before the server is killed
STOP_TIMEOUT_S = 30.0


class InstanceError(RuntimeError):
    """A server of the test's own did not start or stop; the message holds its log's tail."""


class ServerInstance:
    """One server process of the test's own: start, stop, restart, kill, pause, resume.

    Subclasses say how to prepare the data directory once, the command that runs the
    server in the foreground, and how to tell that it answers.
    """

    name = "server"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"pumpflow-{self.name}-"))
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._prepared = False

    # -- what a server kind defines ----------------------------------------------------

    def _prepare(self) -> None:
        """Create the data directory and configuration (once, before the first start)."""

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _user(self) -> str | None:
        """The system user to run the server as (None: this process's own)."""
        return None

    def _answers(self) -> bool:
        """Whether the server accepts its protocol's first exchange right now."""
        return _port_open(self.port)

    def _stop_gracefully(self) -> None:
        assert self._process is not None
        self._signal(signal.SIGTERM)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        """Start the server and wait until it answers on its port."""
        if self.running:
            return
        if _port_open(self.port):
            raise InstanceError(f"{self.name} on port {self.port}: something else listens there")
        if not self._prepared:
            self._prepare()
            self._prepared = True
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            list(self._command()),
            env=self._env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=self._user(),
        )
        self._wait(self._answers, what="answer")

    def stop(self) -> None:
        """Stop the server gracefully (killed after ``STOP_TIMEOUT_S``)."""
        if not self.running:
            self._reap()
            return
        self._stop_gracefully()
        try:
            assert self._process is not None
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """Kill the server and everything it started, at once (``kill -9``)."""
        if self.running:
            self._signal(signal.SIGKILL)
        self._reap()

    def restart(self) -> None:
        """Stop gracefully and start again on the same port and data."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on."""
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the server and remove its data directory (if this instance made it)."""
        self.resume()
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    def _signal(self, signum: int) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signum)

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=STOP_TIMEOUT_S)
        self._process = None
        self._wait(lambda: not _port_open(self.port), what="release its port")

    def _wait(self, condition: Callable[[], bool], *, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            if self._process is not None and self._process.poll() is not None and what == "answer":
                raise InstanceError(
                    f"{self.name} on port {self.port} exited with {self._process.returncode} "
                    f"before it would answer:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise InstanceError(
                    f"{self.name} on port {self.port} did not {what} within "
                    f"{START_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RedisInstance(ServerInstance):
    """A Redis server of the test's own; empty after a restart unless ``persistent``."""

    name = "redis"

    def __init__(self, *, persistent: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> Sequence[str]:
        durability = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *durability,
            "--dir",
            str(self.workdir),
        ]

    def _answers(self) -> bool:
        return _exchange(self.port, b"PING\r\n", b"+PONG")


class RabbitMQInstance(ServerInstance):
    """A RabbitMQ node of the test's own (guest/guest, no plugins), data kept across restarts."""

    name = "rabbitmq"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.node = f"pumpflow-{uuid.uuid4().hex[:8]}@localhost"
        self.dist_port = free_port()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _prepare(self) -> None:
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        # the machine's rabbitmq-env.conf names the shared node; this one names nothing
        (self.workdir / "rabbitmq-env.conf").write_text("")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_PID_FILE=str(self.workdir / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _command(self) -> Sequence[str]:
        return [_rabbitmq_bin("rabbitmq-server")]

    def _answers(self) -> bool:
        return _exchange(self.port, b"AMQP\x00\x00\x09\x01", b"\x01")

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``rabbitmqctl`` against this node."""
        return subprocess.run(
            [_rabbitmq_bin("rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


class PostgresInstance(ServerInstance):
    """A PostgreSQL cluster of the test's own (trust auth, user ``postgres``, database ``test``)."""

    name = "postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    url = dsn

    def _prepare(self) -> None:
        data = self.workdir / "data"
        self.workdir.chmod(0o777)
        _as_postgres(
            [
                _pg_bin("initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            cwd=self.workdir,
        )
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.workdir}'\nfsync = off\n"
                "logging_collector = off\n"
            )

    def start(self) -> None:
        first = not self._prepared
        super().start()
        if first:
            _as_postgres([_pg_bin("createdb"), *self._client_args(), "test"], cwd=self.workdir)

    def _command(self) -> Sequence[str]:
        return [_pg_bin("postgres"), "-D", str(self.workdir / "data")]

    def _client_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]

    def _user(self) -> str | None:
        return _postgres_user()

    def _answers(self) -> bool:
        result = subprocess.run(
            [_pg_bin("pg_isready"), *self._client_args(), "-q"],
            capture_output=True,
        )
        return result.returncode == 0

    def _stop_gracefully(self) -> None:
        # SIGINT is Postgres's "fast" shutdown: clients are disconnected, data is kept
        self._signal(signal.SIGINT)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _exchange(port: int, send: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(send)
            return sock.recv(len(expect)) == expect
    except OSError:
        return False


def _rabbitmq_bin(name: str) -> str:
    # the scripts under /usr/lib/rabbitmq/bin run as the caller; /usr/sbin's wrappers
    # would switch to the rabbitmq user, who cannot write the test's directory
    for folder in ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin"):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise InstanceError(f"{name} is not installed")
    return found


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in versions:
        if (folder / name).exists():
            return str(folder / name)
    raise InstanceError(f"{name} is not installed (looked in PATH and /usr/lib/postgresql)")


def _postgres_user() -> str | None:
    # Postgres refuses to run as root; as root, run it as the postgres system user
    return "postgres" if os.geteuid() == 0 else None


def _as_postgres(command: Sequence[str], *, cwd: Path) -> None:
    result = subprocess.run(
        list(command), capture_output=True, text=True, cwd=cwd, user=_postgres_user()
    )
    if result.returncode != 0:
        raise InstanceError(f"{' '.join(command)} failed: {result.stderr.strip()}")
