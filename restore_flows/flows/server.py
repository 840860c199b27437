"""A local Prefect server, started and stopped by the project (``restore up``, rehearsals, tests).

Prefect's ephemeral mode loses history and dropped task runs under load, so the project always runs a
real server: bound to loopback by default, analytics off and no way out (``restore_flows.offline``), its
own home directory, and the event and task-run batching raised so that thousands of task runs are
recorded in seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from restore_flows.errors import RestoreError
from restore_flows.offline import CLIENT_ENV, server_env

TUNED_SERVER_ENV: Mapping[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The new UI bundles an analytics SDK that calls a third party from the browser whatever the
    # setting above says; the older UI calls nothing. No "Upgrade" button or promotions either.
    "PREFECT_SERVER_UI_V2_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
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
        **CLIENT_ENV,
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
    env.update(server_env(host))
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


@dataclass(frozen=True)
class SharedServer:
    """A local server as this process uses it: its API URL and what was found or done to have it."""

    api_url: str
    said: str
    """What happened, for the terminal: started, or found (and by whom it was started)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def shared_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    database_url: str | None = None,
    on_start: Callable[[], None] = lambda: None,
) -> Iterator[SharedServer]:
    """Use the local Prefect server of ``home``, starting it if none runs; the last user stops it.

    Crash-only: a killed CLI leaves its server running (it is in a session of its own, so a Ctrl-C
    of the CLI does not cut a run's last API calls); the next process finds it, says so, and adopts
    it. Processes that use it at the same time each register (``users/<pid>``); the one that leaves
    last stops it, so a rehearsal finishing never stops the server under another. A server the
    project did not start is used and left alone.
    """
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    users = home / "users"
    users.mkdir(exist_ok=True)
    record = home / "server.json"
    mine = users / str(os.getpid())
    with _locked(home):
        said = ""
        if is_healthy(api_url):
            found = _read(record)
            if found is None:
                said = f"using the Prefect server already running at {api_url} (not started by this project)"
            elif _alive(int(found.get("started_by", 0))):
                said = f"using the Prefect server on {host}:{port} that pid {found['started_by']} started"
            else:
                said = (
                    f"found the Prefect server on {host}:{port} left running by pid {found['started_by']}, "
                    "which is gone: using it (it is stopped by the last run that uses it)"
                )
        else:
            _refuse_busy_port(host, port)
            on_start()
            started = start_server(home, host=host, port=port, database_url=database_url)
            record.write_text(
                json.dumps(
                    {"pid": started.process.pid, "port": port, "host": host, "started_by": os.getpid()}
                )
            )
            said = f"Prefect server ready on {host}:{port} in {started.started_in:.0f} s"
        mine.write_text(str(os.getpid()))
    try:
        yield SharedServer(api_url, said)
    finally:
        drain_clients()
        with _locked(home):
            mine.unlink(missing_ok=True)
            others = [p for p in users.iterdir() if p.name.isdigit() and _alive(int(p.name))]
            found = _read(record)
            if not others and found is not None:
                _stop_pid(int(found.get("pid", 0)))
                record.unlink(missing_ok=True)
            for stale in users.iterdir():
                if stale.name.isdigit() and not _alive(int(stale.name)):
                    stale.unlink(missing_ok=True)


def _read(record: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _refuse_busy_port(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, port)) == 0:
            raise PrefectServerError(
                f"{host}:{port} is taken by something that is not a healthy Prefect server: stop it, "
                "or choose another port with RESTORE_PREFECT_PORT"
            )


def _stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Stop a server started by another process of ours (its process group: the server's workers too)."""
    if pid <= 0 or not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time decides whether to start or stop the server of this home."""
    with open(home / "server.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
