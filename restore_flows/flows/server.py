"""A local Prefect server, started and stopped by the project (``restore up``, rehearsals, tests).

Prefect's ephemeral mode loses history and dropped task runs under load, so the project always runs a
real server: bound to loopback by default, analytics off and no way out (``restore_flows.offline``), its
own home directory, and the event and task-run batching raised so that thousands of task runs are
recorded in seconds, not minutes.
"""

from __future__ import annotations

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
from restore_flows.ledger.liveness import group_alive, process_alive
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


def launch_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    database_url: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``prefect server start`` in a session of its own, without waiting for it (see
    :func:`wait_healthy`): the caller has other work to do while it boots."""
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
    with open(home / "server.log", "ab") as log:
        return subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    database_url: str | None = None,
    timeout: float = 120.0,
) -> PrefectServer:
    """Start ``prefect server start`` and wait until it answers ``/api/health``."""
    started = time.monotonic()
    process = launch_server(home, host=host, port=port, database_url=database_url)
    server = PrefectServer(host, port, home, process, 0.0)
    try:
        wait_healthy(server.api_url, timeout, process)
    except BaseException:
        server.stop()
        raise
    server.started_in = time.monotonic() - started
    return server


def wait_healthy(
    api_url: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Until the server answers ``/api/health``; an error if it exits first (``process``, or
    ``alive`` for a server another process started) or is not healthy within ``timeout``."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as http:
        while True:
            if process is not None and process.poll() is not None:
                raise PrefectServerError(f"the Prefect server exited with status {process.returncode}")
            if alive is not None and not alive():
                raise PrefectServerError(f"the Prefect server at {api_url} exited while starting")
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
            time.sleep(0.1)


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
    ready: Callable[[], str]
    """Waits until the server answers (it may still be starting); returns what to tell the terminal."""


_LAUNCHED: dict[int, subprocess.Popen[bytes]] = {}
"""The servers this process started: their ``Popen`` reaps them (a child reaped behind its back is
reported as still running when the object goes)."""


def _alive(pid: int) -> bool:
    """The process is there and has not ended (a zombie has ended: see ``process_alive``)."""
    launched = _LAUNCHED.get(pid)
    if launched is not None:
        return launched.poll() is None  # reaps it, and its Popen knows
    return process_alive(pid)


STARTING = "starting"
UP = "up"
STOPPING = "stopping"


@contextmanager
def shared_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    database_url: str | None = None,
    on_start: Callable[[], None] = lambda: None,
    timeout: float = 120.0,
) -> Iterator[SharedServer]:
    """Use the local Prefect server of ``home``, starting it if none runs; the last user stops it.

    Crash-only: a killed CLI leaves its server running (it is in a session of its own, so a Ctrl-C
    of the CLI does not cut a run's last API calls); the next process finds it, says so, and adopts
    it. Processes that use it at the same time each register (``users/<pid>``); the one that leaves
    last stops it, so a rehearsal finishing never stops the server under another. A server the
    project did not start is used and left alone.

    The server is not waited for here: a server being started (by this process, or by another that
    may have died since) boots while the caller does its own start-up, and :meth:`SharedServer.ready`
    waits for it. The record (``server.json``) says where the server is in its life: ``starting``
    (wait for it), ``up``, ``stopping``. One that is alive but does not answer and is not starting
    (hung, or half-stopped by a process killed as it stopped it) is replaced.
    """
    home.mkdir(parents=True, exist_ok=True)
    (home / "users").mkdir(exist_ok=True)
    mine = home / "users" / str(os.getpid())
    api_url = f"http://{host}:{port}/api"
    with _locked(home):
        said, wait = _find_or_start(home, host, port, database_url, on_start, timeout)
        mine.write_text(str(os.getpid()))
    try:
        yield SharedServer(api_url, said, wait)
    finally:
        drain_clients()
        with _locked(home):
            mine.unlink(missing_ok=True)
            _stop_if_last(home)


def _find_or_start(
    home: Path,
    host: str,
    port: int,
    database_url: str | None,
    on_start: Callable[[], None],
    timeout: float,
) -> tuple[str, Callable[[], str]]:
    """Under the home's lock: what was found or done, and how to wait until the server answers."""
    api_url = f"http://{host}:{port}/api"
    record = home / "server.json"
    found = _read(record)
    pid = int(found.get("pid", 0)) if found else 0
    if is_healthy(api_url):
        if found is not None and found.get("state") == STARTING:
            _write(record, {**found, "state": UP})  # its starter died before it could say so
        if found is None:
            said = f"using the Prefect server already running at {api_url} (not started by this project)"
        elif _alive(int(found.get("started_by", 0))):
            said = f"using the Prefect server on {host}:{port} that pid {found['started_by']} started"
        else:
            said = (
                f"found the Prefect server on {host}:{port} left running by pid {found['started_by']}, "
                "which is gone: using it (it is stopped by the last run that uses it)"
            )
        return said, lambda: said
    booting_for = time.time() - float(found.get("since", 0)) if found else 0.0
    if found is not None and found.get("state") == STARTING and _alive(pid) and booting_for < timeout:
        waiting = f"the Prefect server on {host}:{port} that pid {found.get('started_by')} started"

        def booted() -> str:
            wait_healthy(api_url, timeout - booting_for, alive=lambda: _alive(pid))
            _mark_up(home, pid)
            return f"{waiting} is ready"

        return f"{waiting} is starting", booted
    replaced = ""
    if found is not None and _alive(pid):
        # Ours, alive, not answering and not starting (or starting for longer than a boot may
        # take): hung, or left half-stopped. Nothing of it is worth a graceful stop.
        _stop_pid(pid, timeout=0.0)
        # Its listening socket outlives it by a moment (seen: accepting after the process was
        # a zombie); starting at once would find the port taken.
        _wait_port_free(host, port, within=5.0)
        replaced = f"replaced the Prefect server pid {pid}, which did not answer; "
    record.unlink(missing_ok=True)
    _refuse_busy_port(host, port)
    on_start()
    began = time.monotonic()
    process = launch_server(home, host=host, port=port, database_url=database_url)
    _LAUNCHED[process.pid] = process
    mine = {"pid": process.pid, "port": port, "host": host, "started_by": os.getpid()}
    _write(record, {**mine, "state": STARTING, "since": time.time()})

    def started() -> str:
        wait_healthy(api_url, timeout, process)
        _mark_up(home, process.pid)
        return f"{replaced}Prefect server ready on {host}:{port} in {time.monotonic() - began:.0f} s"

    return f"{replaced}starting the Prefect server on {host}:{port}", started


def _stop_if_last(home: Path) -> None:
    """Under the home's lock, as a user leaves: stop the server if no user is left."""
    users = home / "users"
    record = home / "server.json"
    others = [p for p in users.iterdir() if p.name.isdigit() and _alive(int(p.name))]
    found = _read(record)
    if not others and found is not None:
        # Said first: a process killed while it stops the server leaves it marked, and the next
        # one replaces it instead of waiting on a server that will never answer.
        _write(record, {**found, "state": STOPPING})
        _stop_pid(int(found.get("pid", 0)))
        record.unlink(missing_ok=True)
    for stale in users.iterdir():
        if stale.name.isdigit() and not _alive(int(stale.name)):
            stale.unlink(missing_ok=True)


def _mark_up(home: Path, pid: int) -> None:
    with _locked(home):
        found = _read(home / "server.json")
        if found is not None and found.get("pid") == pid and found.get("state") == STARTING:
            _write(home / "server.json", {**found, "state": UP})


def _write(record: Path, value: dict[str, Any]) -> None:
    """Replace the record at once (a reader never sees half of it)."""
    scratch = record.with_suffix(".tmp")
    scratch.write_text(json.dumps(value))
    scratch.replace(record)


def _read(record: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def _wait_port_free(host: str, port: int, within: float) -> None:
    deadline = time.monotonic() + within
    while _port_taken(host, port) and time.monotonic() < deadline:
        time.sleep(0.05)


def _refuse_busy_port(host: str, port: int) -> None:
    if _port_taken(host, port):
        raise PrefectServerError(
            f"{host}:{port} is taken by something that is not a healthy Prefect server: stop it, "
            "or choose another port with RESTORE_PREFECT_PORT"
        )


def _stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Stop a server started by another process of ours (its process group: the server's workers
    too): SIGINT, then SIGKILL if it has not ended within ``timeout`` (0: SIGKILL at once)."""
    if pid <= 0 or not _alive(pid):
        return
    if timeout > 0 and _signal_group(pid, signal.SIGINT) and _ended(pid, timeout):
        return
    if _signal_group(pid, signal.SIGKILL):
        _ended(pid, 5.0)


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _ended(pid: int, within: float) -> bool:
    """Whether the process group led by ``pid`` has ended within ``within`` seconds: all of it, as
    a member left running would still hold the server's port."""
    deadline = time.monotonic() + within
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _group_alive(pid)


def _group_alive(pgid: int) -> bool:
    return _alive(pgid) or group_alive(pgid)  # the leader first: a server of ours is reaped


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time decides whether to start or stop the server of this home."""
    with open(home / "server.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
