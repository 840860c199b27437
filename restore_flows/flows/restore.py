"""The Prefect flows: thin glue over the ledger, the dispatcher and the pipeline.

* ``restore-wave``: one wave (optionally narrowed to sites or hosts), in rehearsal or live mode. Before
  the first wipe it pauses with an approval form (live always; rehearsal when asked, otherwise the
  approval is recorded as automatic). Then each host's pipeline runs as one task (1,700 hosts make
  1,700 task nodes, well under the UI's 10,000), dispatched by dependencies and clinical priority.
* ``restore-estate``: every wave in order, each as a ``restore-wave`` subflow with the same gates.
* ``restore-status``: the ledger's progress and ETA as artifacts.

A flow run re-run after a crash (same flow run id) continues its ledger run: same approval, same
leases, and every host resumes from its recorded state.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from enum import StrEnum
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.futures import PrefectFuture, wait
from prefect.input import RunInput
from prefect.states import Completed, Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field, create_model

from restore_flows.bootstrap import Context, live_fleet, load_and_sync, open_ledger
from restore_flows.dispatch import Dispatcher, HostProgress, RunSummary, Status
from restore_flows.drivers.base import Fleet
from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.eta import eta_seconds, format_eta
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage
from restore_flows.ledger.status import bucket, estate_status
from restore_flows.pipeline import HostOutcome, HostPipeline, PipelineSettings
from restore_flows.planning import Plan
from restore_flows.settings import Settings
from restore_flows.states import HostState
from restore_flows.waves import WaveRequest, approval_summary, priority_of, run_reporting, select_hosts

MAX_WORKERS = 64
"""The flows' thread pool is bounded; a run's ``workers`` parameter may use up to this many."""


class Mode(StrEnum):
    REHEARSAL = "rehearsal"
    LIVE = "live"


class WaveParameters(BaseModel):
    """What the ops engineer chooses in the Run form."""

    wave: str = Field(description="The wave to restore. Waves run in the inventory's order.")
    mode: Mode = Field(
        default=Mode.REHEARSAL,
        description="rehearsal: the simulated fleet and the rehearsal ledger. live: real machines.",
    )
    sites: list[str] = Field(default_factory=list, description="Only these sites (empty: every site).")
    hosts: list[str] = Field(default_factory=list, description="Only these hosts (empty: the whole wave).")
    ask_approval: bool = Field(
        default=False,
        description="Rehearsal: pause for the approval form as a live run does (live always asks).",
    )
    approval_timeout_minutes: float = Field(
        default=240.0, gt=0, description="How long to wait for approval; then nothing is wiped."
    )
    workers: int = Field(default=16, ge=1, le=MAX_WORKERS, description="Hosts worked on at once.")
    time_scale: float = Field(
        default=0.0,
        ge=0,
        description="Rehearsal: seconds of real time per simulated minute / 60 (0: instant).",
    )
    fail_rate: float = Field(default=0.0, ge=0, le=1, description="Rehearsal: failure rate of every stage.")
    seed: int = Field(default=0, description="Rehearsal: seed of the injected failures.")
    broken_hosts: list[str] = Field(
        default_factory=list, description="Rehearsal drill: these hosts fail their wipe every time."
    )


class EstateParameters(BaseModel):
    mode: Mode = Field(default=Mode.REHEARSAL, description="rehearsal or live, for every wave.")
    ask_approval: bool = Field(default=False, description="Rehearsal: pause for approval before each wave.")
    approval_timeout_minutes: float = Field(default=240.0, gt=0)
    workers: int = Field(default=16, ge=1, le=MAX_WORKERS)
    time_scale: float = Field(default=0.0, ge=0)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    seed: int = 0


def approval_form(wave: str, summary: str) -> type[RunInput]:
    """The form shown in the UI before the first wipe. Both fields are required and checked."""
    return create_model(
        "WaveApproval",
        __base__=RunInput,
        approver=(
            str,
            Field(min_length=1, description="Your full name. It is recorded in the ledger as the approver."),
        ),
        confirm_wave=(
            str,
            Field(
                min_length=1,
                description=f"Type the wave's name, {wave}, to approve wiping these hosts.\n\n{summary}",
            ),
        ),
    )


@task(cache_policy=NO_CACHE, retries=0, task_run_name="restore {host.name}")
def restore_host(pipeline: HostPipeline, host: Host, done: Callable[[HostOutcome], None]) -> str:
    """One host through every stage. The pipeline retries stages itself, with the ledger's blessing."""
    outcome = run_reporting(pipeline, host, done)
    if not outcome.online:
        get_run_logger().warning("%s: %s (%s)", host.name, outcome.state.value, outcome.error)
    return outcome.state.value


@flow(
    name="restore-wave",
    task_runner=cast("TaskRunner[Any]", ThreadPoolTaskRunner(max_workers=MAX_WORKERS)),
    log_prints=False,
    validate_parameters=True,
)
def restore_wave(params: WaveParameters) -> State[Any]:
    """Restore one wave: approval, then every host through wipe, rebuild, verify and release."""
    logger = get_run_logger()
    settings = Settings()
    rehearsal = params.mode is Mode.REHEARSAL
    with open_ledger(settings, rehearsal=rehearsal, migrate=rehearsal) as context, ExitStack() as stack:
        estate, the_plan, _ = load_and_sync(context, settings.inventory)
        if params.wave not in [w.name for w in the_plan.waves]:
            return Failed(message=f"no wave named {params.wave!r} in the inventory")
        request = WaveRequest(params.wave, params.mode.value, tuple(params.sites), tuple(params.hosts))
        hosts = select_hosts(the_plan, request)
        flow_run_id = str(runtime.flow_run.id)
        ledger = context.ledger
        run_id = ledger.run_for(flow_run_id)
        if run_id is None:
            run_id = ledger.start_run(params.mode.value, params.wave, "prefect", external_id=flow_run_id)
        else:
            logger.info("resuming ledger run %s of this flow run", run_id)
        refused = _approve(context, the_plan, params, run_id, hosts)
        if refused is not None:
            ledger.finish_run(run_id, "not approved")
            return refused
        fleet: Fleet
        if rehearsal:
            fleet = SimulatedFleet(
                time_scale=params.time_scale,
                fail_rates=dict.fromkeys(Stage, params.fail_rate),
                seed=params.seed,
                broken=dict.fromkeys(params.broken_hosts, Stage.WIPE),
            )
        else:
            fleet = stack.enter_context(live_fleet(settings, estate))
        summary = _dispatch(context, the_plan, params, run_id, hosts, fleet)
        ledger.finish_run(run_id, "completed" if summary.ok else "failed")
        text = summary_markdown(params.wave, summary)
        create_markdown_artifact(text, key=f"wave-{params.wave}-summary", description="How the wave ended")
        if summary.ok:
            return Completed(message=f"wave {params.wave}: all {len(summary.hosts)} host(s) online")
        return Failed(
            message=f"wave {params.wave}: {summary.count(Status.FAILED)} failed, "
            f"{summary.count(Status.BLOCKED)} blocked, {summary.count(Status.ONLINE)} online"
        )


def _approve(
    context: Context, the_plan: Plan, params: WaveParameters, run_id: str, hosts: list[str]
) -> State[Any] | None:
    """Record the approval for this run, asking a person when needed. A Failed state if refused."""
    ledger = context.ledger
    if hosts and set(hosts) <= ledger.approved_hosts(run_id):
        return None  # approved before a crash: the re-run keeps it
    summary = approval_summary(the_plan, hosts, ledger)
    if params.mode is Mode.REHEARSAL and not params.ask_approval:
        ledger.record_approval(run_id, params.wave, hosts, "automatic (rehearsal)", summary, automatic=True)
        return None
    create_markdown_artifact(
        f"# Approval needed: wave {params.wave}\n\n{summary}",
        key=f"wave-{params.wave}-approval",
        description="What will be wiped if this run is approved",
    )
    form = approval_form(params.wave, summary)
    try:
        answer: Any = pause_flow_run(
            wait_for_input=form, timeout=int(params.approval_timeout_minutes * 60), poll_interval=2
        )
    except FlowPauseTimeout:
        message = (
            f"no approval within {params.approval_timeout_minutes:g} minutes: nothing was wiped "
            f"in wave {params.wave}"
        )
        # The server fails a run that timed out with its own words; keep ours, which say what happened.
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(runtime.flow_run.id, Failed(message=message), force=True)
        return Failed(message=message)
    if answer.confirm_wave.strip() != params.wave:
        return Failed(
            message=f"approval refused: the wave's name was typed as {answer.confirm_wave!r}, "
            f"not {params.wave!r}; nothing was wiped"
        )
    ledger.record_approval(run_id, params.wave, hosts, answer.approver.strip(), summary)
    get_run_logger().info("approved by %s", answer.approver.strip())
    return None


def _dispatch(
    context: Context,
    the_plan: Plan,
    params: WaveParameters,
    run_id: str,
    hosts: list[str],
    fleet: Fleet,
) -> RunSummary:
    ledger = context.ledger
    progress = WaveProgress(context, the_plan, params.wave, hosts, params.workers)
    pipeline = HostPipeline(
        ledger,
        fleet,
        run_id,
        "prefect",
        PipelineSettings.from_settings(context.settings),
        priority_of(the_plan),
    )

    futures: list[PrefectFuture[str]] = []
    logger = get_run_logger()

    def start(host: Host, done: Callable[[HostOutcome], None]) -> None:
        reported = threading.Event()

        def report(outcome: HostOutcome) -> None:
            reported.set()
            done(outcome)

        def check(future: PrefectFuture[str]) -> None:
            # Seen under load: a task run ends 'Pending' without ever running the function. The host
            # was not touched, so the dispatcher may start it again (it does so a few times).
            if not reported.is_set():
                logger.warning("%s: task run ended %s without running", host.name, future.state.name)
                done(
                    HostOutcome(
                        host.name,
                        HostState.COMPROMISED,
                        f"task run ended {future.state.name}",
                        not_started=True,
                    )
                )

        # quote(): hand the objects over as they are; Prefect would otherwise walk and rebuild them.
        future = restore_host.submit(*(cast(Any, quote(arg)) for arg in (pipeline, host, report)))
        futures.append(future)
        future.add_done_callback(check)

    summary = Dispatcher(
        the_plan, hosts, ledger, start, max_parallel=params.workers, on_change=progress.changed
    ).run()
    wait(futures)  # let the last task runs record their final state before the flow ends
    progress.finish(summary)
    return summary


class WaveProgress:
    """Keyed artifacts managers watch: wave and estate progress (0-100), a table per site/department.

    Progress artifacts update in place; tables cannot, so a new version is created now and then.
    """

    def __init__(
        self,
        context: Context,
        the_plan: Plan,
        wave: str,
        hosts: list[str],
        workers: int,
        table_every: float = 30.0,
    ) -> None:
        self._ledger = context.ledger
        self._logger = get_run_logger()
        self._plan = the_plan
        self._wave = wave
        self._members = set(hosts)
        self._workers = workers
        self._started = time.monotonic()
        self._done_here: set[str] = set()
        self._table_every = table_every
        self._lock = threading.Lock()
        states = self._ledger.states()
        self._wave_total = len(the_plan.wave(wave).hosts)
        self._estate_total = len(states)
        wave_hosts = set(the_plan.wave(wave).hosts)
        self._online = {n for n, s in states.items() if bucket(s) == "online"}
        self._wave_hosts = wave_hosts
        self._wave_online = len(self._online & wave_hosts)
        self._estate_online = len(self._online)
        self._wave_id = self._new_progress(
            self._percent(self._wave_online, self._wave_total),
            key=f"wave-{wave}-progress",
            description=f"Hosts of wave {wave} online, in percent",
        )
        self._estate_id = self._new_progress(
            self._percent(self._estate_online, self._estate_total),
            key="estate-progress",
            description="Hosts of the whole estate online, in percent",
        )
        self._rows: dict[str, HostProgress] = {}
        self._last_table = 0.0
        self._last_update = 0.0

    @staticmethod
    def _new_progress(progress: float, key: str, description: str) -> UUID:
        return cast(UUID, create_progress_artifact(progress, key=key, description=description))

    @staticmethod
    def _percent(part: int, whole: int) -> float:
        return round(100.0 * part / whole, 1) if whole else 100.0

    def changed(self, item: HostProgress) -> None:
        if item.status in (Status.WAITING, Status.BLOCKED) and item.reason:
            # Engineers read why a host is not moving in the run's logs: "ws-x: waiting for dc-y ...".
            self._logger.info("%s: %s", item.host, item.reason)
        with self._lock:
            self._rows[item.host] = item
            if item.status is Status.ONLINE and item.host not in self._online:
                self._online.add(item.host)
                self._done_here.add(item.host)
                self._wave_online += item.host in self._wave_hosts
                self._estate_online += 1
            now = time.monotonic()
            if item.status is Status.ONLINE and now - self._last_update > 0.5:
                self._last_update = now
                self._push()
            if now - self._last_table > self._table_every:
                self._last_table = now
                self._table()

    def finish(self, summary: RunSummary) -> None:
        with self._lock:
            self._rows.update(summary.hosts)
            self._push()
            self._table()

    def _push(self) -> None:
        update_progress_artifact(self._wave_id, self._percent(self._wave_online, self._wave_total))
        update_progress_artifact(self._estate_id, self._percent(self._estate_online, self._estate_total))

    def _table(self) -> None:
        counts: dict[tuple[str, str], Counter[str]] = {}
        for item in self._rows.values():
            counts.setdefault((item.site, item.department), Counter())[item.status.value] += 1
        rows = [
            {
                "site": site,
                "department": department,
                "online": c[Status.ONLINE.value],
                "in progress": c[Status.RUNNING.value],
                "failed": c[Status.FAILED.value],
                "blocked": c[Status.BLOCKED.value],
                "waiting": c[Status.WAITING.value] + c[Status.PENDING.value],
                "total": sum(c.values()),
            }
            for (site, department), c in sorted(counts.items())
        ]
        create_table_artifact(
            rows, key=f"wave-{self._wave}-sites", description=f"Wave {self._wave} per site and department"
        )
        create_markdown_artifact(self.eta_text(), key=f"wave-{self._wave}-eta", description="Time to finish")

    def eta_text(self) -> str:
        hosts = self._plan.estate.hosts
        finished = {n for n, item in self._rows.items() if item.status in (Status.FAILED, Status.BLOCKED)}
        remaining = [hosts[n] for n in self._members - self._online - finished]
        seconds = eta_seconds(
            [hosts[n] for n in self._done_here],
            remaining,
            self._plan.estate.pools,
            self._workers,
            time.monotonic() - self._started,
        )
        return (
            f"# Wave {self._wave}: estimated time to finish: {format_eta(seconds)}\n\n"
            f"{len(remaining)} host(s) left, {len(self._done_here)} done in this run. The estimate is the "
            "remaining planned work of the busiest pool (or of all workers), scaled by the speed observed "
            "so far; it improves as stages finish.\n"
        )


def summary_markdown(wave: str, summary: RunSummary) -> str:
    lines = [
        f"# Wave {wave}: {'all online' if summary.ok else 'not complete'}",
        "",
        f"- online: {summary.count(Status.ONLINE)}",
        f"- failed: {summary.count(Status.FAILED)}",
        f"- blocked: {summary.count(Status.BLOCKED)}",
        f"- elapsed: {summary.elapsed_seconds:.0f} s",
    ]
    if summary.failed():
        lines += ["", "## Failed", "", "| host | state | error |", "| --- | --- | --- |"]
        lines += [f"| {p.host} | {p.state.value} | {p.error or ''} |" for p in summary.failed()]
    if summary.blocked():
        lines += ["", "## Blocked", "", "| host | why |", "| --- | --- |"]
        lines += [f"| {p.host} | {p.reason or ''} |" for p in summary.blocked()]
    return "\n".join(lines) + "\n"


@flow(name="restore-estate", log_prints=False)
def restore_estate(params: EstateParameters) -> State[Any]:
    """Every wave in order, each with its own approval gate. Stops at the first wave not complete."""
    settings = Settings()
    with open_ledger(settings, rehearsal=params.mode is Mode.REHEARSAL, migrate=True) as context:
        _, the_plan, _ = load_and_sync(context, settings.inventory)
        waves = [w.name for w in the_plan.waves if w.hosts]
    results: list[str] = []
    for wave in waves:
        state = restore_wave(
            WaveParameters(
                wave=wave,
                mode=params.mode,
                ask_approval=params.ask_approval,
                approval_timeout_minutes=params.approval_timeout_minutes,
                workers=params.workers,
                time_scale=params.time_scale,
                fail_rate=params.fail_rate,
                seed=params.seed,
            ),
            return_state=True,
        )
        results.append(f"{wave}: {state.message or state.name}")
        if not state.is_completed():
            return Failed(message="; ".join(results) + " - later waves were not started")
    return Completed(message="; ".join(results))


class StatusParameters(BaseModel):
    mode: Mode = Field(default=Mode.LIVE, description="Which ledger to report on: live or rehearsal.")


@flow(name="restore-status", log_prints=False)
def restore_status(params: StatusParameters) -> State[Any]:
    """The ledger's progress as artifacts: estate progress, and per wave online %, states and ETA."""
    settings = Settings()
    rehearsal = params.mode is Mode.REHEARSAL
    with open_ledger(settings, rehearsal=rehearsal, migrate=rehearsal) as context:
        _, the_plan, _ = load_and_sync(context, settings.inventory)
        report = estate_status(context.ledger, the_plan)
    create_progress_artifact(
        report["estate"]["percent"], key="estate-progress", description="Hosts of the whole estate online"
    )
    rows = [
        {
            "wave": name,
            "online %": group["percent"],
            "online": group["online"],
            "total": group["total"],
            "ETA": format_eta(group["eta_seconds"]),
        }
        for name, group in report["waves"].items()
    ]
    create_table_artifact(rows, key="estate-status", description="Per wave: online, total, ETA")
    return Completed(message=f"{report['estate']['percent']}% of the estate online")
