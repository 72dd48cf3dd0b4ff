"""Services as processes (``pumpflow serve ...``) against the test's servers and namespace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pumpflow.common.testing.servers import POSTGRES_DSN

#: the console scripts of the environment the tests run in
BIN = Path(sys.executable).parent
PUMPFLOW = BIN / "pumpflow"


def settings_env(**settings: object) -> dict[str, str]:
    """Settings as environment variables: ``heartbeat_ttl_s=3`` is ``PUMPFLOW_HEARTBEAT_TTL_S``.

    Upper-case names are taken as they are (``PUMPPORTAL_WS_URL``); booleans are
    ``true``/``false``.
    """
    env = {}
    for name, value in settings.items():
        variable = name if name.isupper() else f"PUMPFLOW_{name.upper()}"
        env[variable] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def stack_env(
    *,
    namespace: str,
    amqp_url: str,
    redis_url: str,
    postgres_dsn: str = POSTGRES_DSN,
    partitions: int = 4,
    transport: str = "rabbitmq",
    base: Mapping[str, str] | None = None,
    **settings: object,
) -> dict[str, str]:
    """The environment of a service process on the test's broker vhost, Redis and Postgres.

    ``namespace`` prefixes the process's exchanges and queues, its Redis keys and names
    its Postgres schema, as it does the test's own. ``base`` defaults to this process's
    environment; ``settings`` are added as :func:`settings_env` spells them.
    """
    env = dict(os.environ if base is None else base)
    env.update(
        settings_env(
            transport=transport,
            namespace=namespace,
            partitions=partitions,
            amqp_url=amqp_url,
            redis_url=redis_url,
            postgres_dsn=postgres_dsn,
            log_format="text",
            **settings,
        )
    )
    return env


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET; status 0 while nothing answers (a process starting)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def http_json(url: str, timeout: float = 2.0) -> Any:
    """The JSON body of a GET (error statuses included), or None without one."""
    status, body = http_get(url, timeout)
    if not status:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


class ProcessStack:
    """The processes of one test: started with one environment, logged to files, ended.

    :meth:`serve` and :meth:`start` add processes, :meth:`stop` ends one by a signal
    and returns its exit code, :meth:`logs` is what a failed assertion should show,
    :meth:`aclose` kills what is left and deletes the broker queues of the services.
    """

    def __init__(self, env: Mapping[str, str], logdir: Path):
        self.env = dict(env)
        self.logdir = Path(logdir)
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, IO[str]] = {}
        self._services: set[str] = set()

    def configure(self, **settings: object) -> None:
        """Change the environment of the processes started from now on."""
        self.env.update(settings_env(**settings))

    def start(self, name: str, argv: Sequence[str | Path], **settings: object) -> subprocess.Popen:
        """Start ``argv`` as ``name`` (its log: ``<logdir>/<name>.log``) with extra settings."""
        if name in self.procs and self.procs[name].poll() is None:
            raise ValueError(f"{name} is running already")
        log = self._logs.get(name) or open(self.logdir / f"{name}.log", "a")
        self._logs[name] = log
        proc = subprocess.Popen(
            [str(a) for a in argv],
            env={**self.env, **settings_env(**settings)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def pumpflow(self, name: str, *args: str, **settings: object) -> subprocess.Popen:
        """Start ``pumpflow <args>`` as ``name``."""
        return self.start(name, [PUMPFLOW, *args], **settings)

    def serve(
        self, service: str, *, name: str | None = None, **settings: object
    ) -> subprocess.Popen:
        """Start ``pumpflow serve <service>`` as ``name`` (default the service's name).

        Give replicas distinct names and ``replica=``; ``http_port=0`` turns HTTP off.
        """
        self._services.add(service)
        return self.pumpflow(name or service, "serve", service, **settings)

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``pumpflow <args>`` to its end (``migrate``, say), output captured."""
        return subprocess.run(
            [str(PUMPFLOW), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    async def stop(self, name: str, *, sig: int = signal.SIGTERM, within: float = 60.0) -> int:
        """Send ``sig`` to ``name`` and return its exit code once it ended."""
        proc = self.procs[name]
        proc.send_signal(sig)
        try:
            return await asyncio.to_thread(proc.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not end within {within:g} s\n{self.logs()}") from None

    async def stop_all(
        self, names: Sequence[str], *, sig: int = signal.SIGTERM, within: float = 60.0
    ) -> dict[str, int]:
        """Signal all of ``names`` at once, then wait for each; return their exit codes."""
        for name in names:
            self.procs[name].send_signal(sig)
        codes = {}
        for name in names:
            try:
                codes[name] = await asyncio.to_thread(self.procs[name].wait, within)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{name} did not end within {within:g} s\n{self.logs()}"
                ) from None
        return codes

    def logs(self, tail: int = 3000) -> str:
        """The end of every process's log, for assertion messages."""
        for log in self._logs.values():
            log.flush()
        return "\n".join(
            f"--- {name}\n{(self.logdir / f'{name}.log').read_text()[-tail:]}"
            for name in sorted(self.procs)
        )

    def kill(self) -> None:
        """Kill every process still running and close the logs."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    async def aclose(self) -> None:
        """Kill what is left, then delete the durable queues of the services served."""
        await asyncio.to_thread(self.kill)
        services, self._services = sorted(self._services), set()
        if self.env.get("PUMPFLOW_TRANSPORT") != "rabbitmq" or not services:
            return
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        cleanup = RabbitMQBus(
            url=self.env["PUMPFLOW_AMQP_URL"],
            namespace=self.env["PUMPFLOW_NAMESPACE"],
            partitions=int(self.env.get("PUMPFLOW_PARTITIONS", "16")),
            source="test/cleanup",
            connect_attempts=3,
        )
        try:
            await cleanup.delete_topology(services=services)
        finally:
            await cleanup.close()

    async def __aenter__(self) -> ProcessStack:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
