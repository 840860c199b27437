"""What managers watch while a run goes: keyed artifacts on the run and the Artifacts page.

* ``wave-<name>-progress`` (0-100, updated in place) for each wave in the run, and ``estate-progress``;
* ``run-sites``: a table per wave, site and department (online, in progress, waiting, failed, blocked);
* ``run-eta``: the forecast from the ledger (the one ETA), per wave, with what holds progress back.

Progress artifacts update in place; tables and markdown cannot, so a new version is made now and then
by a thread of its own (the forecast takes a moment; the run's scheduling must not wait for it).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from restore_flows.bootstrap import Context
from restore_flows.execution.campaign import HostProgress, RunSummary, Status
from restore_flows.execution.eta import forecast_from_ledger, format_minutes
from restore_flows.ledger.status import bucket
from restore_flows.planning import Plan


class RunProgress:
    def __init__(
        self,
        context: Context,
        the_plan: Plan,
        hosts: list[str],
        *,
        time_scale: float = 0.0,
        every: float = 15.0,
    ) -> None:
        self._ledger = context.ledger
        self._logger = get_run_logger()
        self._plan = the_plan
        self._members = set(hosts)
        self._pace = time_scale if time_scale > 0 else 1.0
        self._every = every
        self._lock = threading.Lock()
        self._rows: dict[str, HostProgress] = {}
        self._said: set[str] = set()
        states = self._ledger.states()
        self._waves = [w.name for w in the_plan.waves if self._members & set(w.hosts)]
        self._wave_hosts = {w: set(the_plan.wave(w).hosts) for w in self._waves}
        self._online = {n for n, s in states.items() if bucket(s) == "online"}
        self._total = len(states)
        self._ids: dict[str, UUID] = {}
        for wave in self._waves:
            self._ids[wave] = self._new_progress(
                self._percent(self._wave_hosts[wave]),
                key=f"wave-{wave}-progress",
                description=f"Hosts of wave {wave} online, in percent",
            )
        self._ids["estate"] = self._new_progress(
            self._estate_percent(), key="estate-progress", description="Hosts of the whole estate online"
        )
        self._dirty = False
        self._last_table: list[dict[str, Any]] | None = None
        self._last_eta: str | None = None
        self._stop = threading.Event()
        # The thread makes artifacts of this flow run: it needs the run's context.
        run_context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=run_context.run, args=(self._loop,), name="run-progress", daemon=True
        )

    def __enter__(self) -> RunProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @staticmethod
    def _new_progress(progress: float, key: str, description: str) -> UUID:
        return cast(UUID, create_progress_artifact(progress, key=key, description=description))

    def _percent(self, names: set[str]) -> float:
        return round(100.0 * len(self._online & names) / len(names), 1) if names else 100.0

    def _estate_percent(self) -> float:
        return round(100.0 * len(self._online) / self._total, 1) if self._total else 100.0

    def changed(self, item: HostProgress) -> None:
        # Failures once each, as warnings (the terminal shows those); a blocked host is an INFO line
        # (in the UI's log, not the terminal's): hundreds can be blocked behind one failure, which
        # the failure's own line and the summary already say.
        if item.status is Status.FAILED and item.host not in self._said:
            self._said.add(item.host)
            self._logger.warning("%s: %s", item.host, item.error or item.reason)
        elif item.status is Status.BLOCKED and item.reason and item.host not in self._said:
            self._said.add(item.host)
            self._logger.info("%s: %s", item.host, item.reason)
        with self._lock:
            self._rows[item.host] = item
            if item.status is Status.ONLINE and item.host not in self._online:
                self._online.add(item.host)
                self._dirty = True

    def tick(self) -> None:
        """Called by the runner on each look at the ledger. The percentages are pushed by this object's
        own thread: an API call here would delay the run's next decisions."""

    def finish(self, summary: RunSummary) -> None:
        with self._lock:
            self._rows.update(summary.hosts)
        self._push()
        self._tables()

    def _push(self) -> None:
        with self._lock:
            values = {wave: self._percent(self._wave_hosts[wave]) for wave in self._waves}
            estate = self._estate_percent()
        for wave, value in values.items():
            update_progress_artifact(self._ids[wave], value)
        update_progress_artifact(self._ids["estate"], estate)

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.wait(1.0):
            with self._lock:
                dirty, self._dirty = self._dirty, False
            if dirty:
                try:
                    self._push()
                except Exception:  # a report must never stop the run
                    self._logger.warning("could not update the progress artifacts", exc_info=True)
            if time.monotonic() - last >= self._every:
                last = time.monotonic()
                try:
                    self._tables()
                except Exception:  # a report must never stop the run
                    self._logger.warning("could not update the progress tables", exc_info=True)

    def _tables(self) -> None:
        with self._lock:
            rows = list(self._rows.values())
        counts: dict[tuple[str, str, str], Counter[str]] = {}
        for item in rows:
            counts.setdefault((item.wave, item.site, item.department), Counter())[item.status.value] += 1
        table = [
            {
                "wave": wave,
                "site": site,
                "department": department,
                "online": c[Status.ONLINE.value],
                "in progress": c[Status.RUNNING.value],
                "waiting": c[Status.WAITING.value] + c[Status.PENDING.value],
                "failed": c[Status.FAILED.value],
                "blocked": c[Status.BLOCKED.value],
                "total": sum(c.values()),
            }
            for (wave, site, department), c in sorted(counts.items())
        ]
        # A new version only when it says something new: a run waiting hours for its approval would
        # otherwise stack up a card every few seconds on the run's Artifacts tab.
        if table != self._last_table:
            create_table_artifact(table, key="run-sites", description="Per wave, site and department")
            self._last_table = table
        eta = self.eta_text(rows)
        if eta != self._last_eta:
            create_markdown_artifact(eta, key="run-eta", description="Forecast: when each wave is back")
            self._last_eta = eta

    def eta_text(self, rows: list[HostProgress]) -> str:
        forecast = forecast_from_ledger(self._ledger, self._plan, default_pace=self._pace)
        lines = [
            "# When each wave is back (forecast from the ledger)",
            "",
            "| wave | online | ETA |",
            "| --- | --- | --- |",
        ]
        for wave in self._waves:
            found = forecast.waves.get(wave)
            eta = format_minutes(found.finish_minutes) if found else "?"
            lines.append(f"| {wave} | {self._percent(self._wave_hosts[wave])} % | {eta} |")
        reasons = Counter(
            _gist(item.reason) for item in rows if item.status is Status.WAITING and item.reason
        )
        if reasons:
            lines += ["", "## What hosts wait for", "", "| hosts | waiting for |", "| --- | --- |"]
            lines += [f"| {count} | {why} |" for why, count in reasons.most_common(8)]
        return "\n".join(lines) + "\n"


def _gist(reason: str) -> str:
    """'waiting for dc-arl-01 to be online before verify' -> 'dc-arl-01 to be online before verify'."""
    return reason.removeprefix("waiting for ").split(" (and ")[0]


def summary_markdown(scope: str, summary: RunSummary, the_plan: Plan) -> str:
    lines = [
        f"# {scope}: {'all online' if summary.ok else 'not complete'}",
        "",
        f"- online: {summary.count(Status.ONLINE)}",
        f"- failed: {summary.count(Status.FAILED)}",
        f"- blocked: {summary.count(Status.BLOCKED)}",
        f"- elapsed: {summary.elapsed_seconds:.0f} s",
    ]
    for wave, why in summary.refused.items():
        lines.append(f"- wave {wave} not approved: {why}")
    if summary.failed():
        lines += ["", "## Failed", "", "| host | state | error |", "| --- | --- | --- |"]
        lines += [f"| {p.host} | {p.state.value} | {_cell(p.error)} |" for p in summary.failed()]
    if summary.blocked():
        lines += ["", "## Blocked", "", "| host | why |", "| --- | --- |"]
        lines += [f"| {p.host} | {_cell(p.reason)} |" for p in summary.blocked()]
    if summary.steps:
        lines += ["", "## Procedure steps", "", "| step | status | why |", "| --- | --- | --- |"]
        lines += [
            f"| {s.step} | {'done' if s.status is Status.ONLINE else s.status.value} | "
            f"{_cell(s.error or s.reason)} |"
            for s in summary.steps.values()
        ]
    return "\n".join(lines) + "\n"


def _cell(text: str | None) -> str:
    return (text or "").split("\n")[0].replace("|", "\\|")
