"""The managers' live dashboard: a read-only web page on loopback, served from inside ``restore up``.

It shows per wave (and per site and department in it) the share online, the counts, the ETA from the
forecast (:func:`restore_flows.execution.eta.forecast_from_ledger`, the one ETA), what needs an
operator and what others wait for, and a timeline of plan, done and forecast. The page polls
``api/status.json`` every 2 s, so it changes by itself within 5 s of the ledger.

    handle = serve_dashboard(settings, "127.0.0.1", 4201, rehearsal=False)   # returns at once
    print(f"dashboard: {handle.url}")
    ...
    handle.stop()            # or: with serve_dashboard(...) as handle: ...

From ``restore up`` start it before ``serve(...)`` (which blocks) and stop it in a ``finally``; the
server runs in daemon threads, so it never keeps the process alive. Routes:

* ``/``: the page (``?ledger=rehearsal`` or ``?ledger=live`` picks the ledger; the default is the
  ``rehearsal`` flag given here);
* ``/api/status.json``: the data (:meth:`Overview.to_json` plus ``ledger``); 503 with ``error`` when the
  ledger or the inventory cannot be read;
* ``/timeline.svg``: the gantt of :mod:`restore_flows.reporting.timeline`;
* ``/dashboard.js``, ``/dashboard.css``: the page's only script and style.

Why the standard library's ``http.server``: a handful of GET routes for a few people on one machine
need no framework, and it adds no dependency to a tool that must install offline. ``ThreadingHTTPServer``
answers each request in its own thread, so one slow forecast never stalls the page for the others.

Nothing here writes: it reads the ledger through ``open_ledger`` (opened per refresh, because a
rehearsal may delete and recreate its SQLite file at any time) and the inventory from
``settings.inventory`` (read again when a file in it changes), and never syncs one into the other.
The forecast costs about 0.2 s for 1,700 hosts, so each ledger's reading is kept ``cache_seconds``
and computed by one request at a time while the others wait for it.

The page loads nothing but what this server serves, and says so to the browser: a Content-Security-
Policy allows only this origin for scripts, styles, images and fetches. Requests whose Host header is
not this server's address are refused, so that a web page elsewhere cannot read the dashboard through
DNS rebinding.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from restore_flows.bootstrap import open_ledger
from restore_flows.errors import InventoryError, RestoreError, UsageError
from restore_flows.inventory.loader import load_estate
from restore_flows.planning import Plan, plan
from restore_flows.reporting.overview import overview, plan_pace, planned
from restore_flows.reporting.timeline import gantt_svg
from restore_flows.scheduling.forecast import Forecast
from restore_flows.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PORT = 4201
"""Next to Prefect's 4200."""

POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of one ledger, as served."""

    status: HTTPStatus
    json: bytes
    svg: bytes | None
    taken: float
    """time.monotonic() when it was read."""


class StatusSource:
    """The ledgers' state as the page wants it, read at most once per ``cache_seconds`` per ledger."""

    def __init__(
        self,
        settings: Settings,
        *,
        cache_seconds: float = 2.0,
        default_pace: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._cache_seconds = cache_seconds
        self._pace = default_pace
        self._monotonic = monotonic
        self._readings: dict[bool, Reading] = {}
        self._locks = {True: threading.Lock(), False: threading.Lock()}
        self._plan_lock = threading.Lock()
        self._plan: tuple[tuple[tuple[str, int, int], ...], Plan] | None = None
        self._plan_forecasts: dict[float, Forecast] = {}

    def reading(self, rehearsal: bool) -> Reading:
        with self._locks[rehearsal]:
            cached = self._readings.get(rehearsal)
            if cached is not None and self._monotonic() - cached.taken < self._cache_seconds:
                return cached
            fresh = self._read(rehearsal)
            self._readings[rehearsal] = fresh
            return fresh

    def _read(self, rehearsal: bool) -> Reading:
        ledger_name = "rehearsal" if rehearsal else "live"
        try:
            the_plan = self._current_plan()
            with open_ledger(self._settings, rehearsal=rehearsal) as context:
                pace = self._pace or plan_pace(context.ledger, the_plan, rehearsal)
                view = overview(
                    context.ledger, the_plan, plan_forecast=self._planned(the_plan, pace), default_pace=pace
                )
        except InventoryError as exc:
            return self._failed(ledger_name, f"the inventory cannot be used: {exc}")
        except RestoreError as exc:
            return self._failed(ledger_name, str(exc))
        except Exception as exc:  # the dashboard must never take 'restore up' down with it
            log.warning("dashboard: could not read the %s ledger", ledger_name, exc_info=True)
            return self._failed(ledger_name, f"{type(exc).__name__}: {exc}")
        data = {"ledger": ledger_name, **view.to_json()}
        return Reading(
            HTTPStatus.OK,
            json.dumps(data, separators=(",", ":")).encode(),
            gantt_svg(view).encode(),
            self._monotonic(),
        )

    def _failed(self, ledger_name: str, error: str) -> Reading:
        body = json.dumps({"ledger": ledger_name, "error": error, "at": _now_iso()}).encode()
        return Reading(HTTPStatus.SERVICE_UNAVAILABLE, body, None, self._monotonic())

    def _current_plan(self) -> Plan:
        """The plan of the inventory as it is on disk now."""
        signature = _signature(self._settings.inventory)
        with self._plan_lock:
            if self._plan is None or self._plan[0] != signature:
                self._plan = (
                    signature,
                    plan(load_estate(self._settings.inventory, self._settings.max_hosts)),
                )
                self._plan_forecasts = {}
            return self._plan[1]

    def _planned(self, the_plan: Plan, pace: float) -> Forecast:
        """The plan's forecast from nothing restored, at ``pace``: the same for as long as both are."""
        with self._plan_lock:
            found = self._plan_forecasts.get(pace)
        if found is None:
            found = planned(the_plan, pace)
            with self._plan_lock:
                if self._plan is not None and self._plan[1] is the_plan:
                    self._plan_forecasts[pace] = found
        return found


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when an inventory file is edited, added or removed: cheap enough per refresh."""
    if not directory.is_dir():
        return ()
    files = sorted(directory.rglob("*.yaml"))
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


class Dashboard:
    """A running dashboard server. ``url`` is where the page is; ``stop()`` ends it."""

    def __init__(self, server: _Server, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_dashboard(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    rehearsal: bool = False,
    cache_seconds: float = 2.0,
    default_pace: float | None = None,
) -> Dashboard:
    """Start the dashboard on ``host``:``port`` (port 0: any free port) in a background thread.

    ``host`` must be a loopback address (or ``localhost``): the page shows host names and errors and
    has no login; people elsewhere reach it through an SSH tunnel. ``rehearsal``: the ledger shown when
    the page does not say (``?ledger=``). ``default_pace``: a rehearsal's time scale, for the plan and
    for the ETA before any stage was seen (default: 1.0 live; in a rehearsal, the pace its ledger
    shows). Raises ``UsageError`` for another address or a port in use.
    """
    address = _loopback(host)
    source = StatusSource(settings, cache_seconds=cache_seconds, default_pace=default_pace)
    server_class = _V6Server if ":" in address else _Server
    try:
        server = server_class((address, port), _handler(source, rehearsal))
    except OSError as exc:
        raise UsageError(f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True
    bound = int(server.server_address[1])
    shown = f"[{address}]" if ":" in address else address
    server.allowed_hosts = frozenset(
        f"{name}:{bound}" for name in {shown, "localhost", "127.0.0.1", "[::1]", host}
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="dashboard", daemon=True
    )
    thread.start()
    return Dashboard(server, thread, f"http://{shown}:{bound}/")


class _Server(ThreadingHTTPServer):
    allowed_hosts: frozenset[str] = frozenset()
    """The Host headers a browser sends for the names this server answers to."""


class _V6Server(_Server):
    address_family = socket.AF_INET6


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return host.strip("[]")
    except ValueError:
        pass
    raise UsageError(
        f"the dashboard serves loopback only (127.0.0.1, ::1, localhost), not {host!r}: it has no login; "
        "reach it from elsewhere through an SSH tunnel"
    )


def _handler(source: StatusSource, rehearsal_default: bool) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        def version_string(self) -> str:
            return "restore-dashboard"

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            if self.headers.get("Host", "") not in cast(_Server, self.server).allowed_hosts:
                self._send(HTTPStatus.FORBIDDEN, b"unknown Host header\n", "text/plain", body)
                return
            url = urlsplit(self.path)
            if url.path in _STATIC:
                name, kind = _STATIC[url.path]
                self._send(HTTPStatus.OK, _asset(name), kind, body)
                return
            if url.path not in ("/api/status.json", "/timeline.svg"):
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body)
                return
            chosen = parse_qs(url.query).get("ledger", [""])[-1]
            if chosen not in ("", "rehearsal", "live"):
                refusal = b'{"error":"ledger is rehearsal or live"}'
                self._send(HTTPStatus.BAD_REQUEST, refusal, "application/json", body)
                return
            reading = source.reading(chosen == "rehearsal" if chosen else rehearsal_default)
            if url.path == "/api/status.json":
                self._send(reading.status, reading.json, "application/json", body)
            elif reading.svg is None:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"no reading\n", "text/plain", body)
            else:
                self._send(HTTPStatus.OK, reading.svg, "image/svg+xml", body)

        def _send(self, status: HTTPStatus, content: bytes, kind: str, body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Content-Security-Policy", POLICY)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if body:
                self.wfile.write(content)

        def log_message(self, format: str, *args: Any) -> None:
            # A poll every 2 s per open page would bury 'restore up''s own output.
            log.debug("dashboard %s: " + format, self.address_string(), *args)

    return _Handler


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("restore_flows.web").joinpath("static", name).read_bytes()
