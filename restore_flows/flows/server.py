"""A local Prefect server, started and stopped by the project (``restore up``, rehearsals, tests).

Prefect's ephemeral mode loses history and dropped task runs under load, so the project always runs a
real server: bound to loopback by default, analytics off, its own home directory, and the event and
task-run batching raised so that thousands of task runs are recorded in seconds, not minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from restore_flows.errors import RestoreError

TUNED_SERVER_ENV: Mapping[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TRIGGERS_READ_BATCH_SIZE": "100",
}


class PrefectServerError(RestoreError):
    pass


@dataclass
class PrefectServer:
    host: str
    port: int
    home: Path
    process: subprocess.Popen[bytes]
    started_in: float

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a process that talks to this server (serve, flows, clients)."""
        env = dict(os.environ if base is None else base)
        env.update(client_settings(self.api_url, self.home))
        return env

    def stop(self, timeout: float = 20.0) -> None:
        stop_process_group(self.process, signal.SIGINT, timeout)


def client_settings(api_url: str, home: Path) -> dict[str, str]:
    return {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # A missing API URL must be an error, never a throw-away ephemeral server.
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    }


def start_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    database_url: str | None = None,
    timeout: float = 120.0,
) -> PrefectServer:
    """Start ``prefect server start`` and wait until it answers ``/api/health``."""
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    env = dict(os.environ)
    env.pop("PREFECT_PROFILE", None)
    env.update(TUNED_SERVER_ENV)
    env.update(client_settings(api_url, home))
    # Without it the UI in the browser calls port 4200 whatever port the server is on.
    env["PREFECT_UI_API_URL"] = api_url
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    prefect = Path(sys.executable).with_name("prefect")
    started = time.monotonic()
    with open(home / "server.log", "ab") as log:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = PrefectServer(host, port, home, process, 0.0)
    try:
        wait_healthy(api_url, timeout, process)
    except BaseException:
        server.stop()
        raise
    server.started_in = time.monotonic() - started
    return server


def wait_healthy(api_url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as http:
        while True:
            if process is not None and process.poll() is not None:
                raise PrefectServerError(f"the Prefect server exited with status {process.returncode}")
            try:
                answer = http.get(f"{api_url}/health")
                if answer.status_code == 200 and answer.json() is True:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"the Prefect server at {api_url} was not healthy after {timeout:.0f} s"
                )
            time.sleep(0.25)


def is_healthy(api_url: str) -> bool:
    try:
        with httpx.Client(timeout=2.0) as http:
            answer = http.get(f"{api_url}/health")
            return answer.status_code == 200 and answer.json() is True
    except httpx.HTTPError:
        return False


def stop_process_group(
    process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0
) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        except ProcessLookupError:
            pass


def drain_clients(timeout: float = 30.0) -> None:
    """Send this process's pending Prefect logs and events now, while the server still listens.

    Prefect drains them at interpreter exit; if the server is gone by then, the exit waits on retries.
    """
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)


@contextmanager
def running_server(home: Path, **kwargs: object) -> Iterator[PrefectServer]:
    server = start_server(home, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        drain_clients()
        server.stop()
