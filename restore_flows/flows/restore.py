"""The Prefect flows: thin glue over the campaign runner.

* ``restore-estate``: the campaign. Every chosen wave (all by default) is scheduled at once: a stage
  starts as soon as its dependencies, its wave's approval and its pools allow, so intensive care comes
  back first without the later waves waiting for it to finish. Each wave's destructive work needs its
  approval (live always; rehearsal when asked); the form may approve several waves at once, or one at
  a time while the others run.
* ``restore-wave``: one wave (optionally narrowed to sites or hosts), the same runner and scheduling;
  pools are shared with every other run in clinical order through the ledger.
* ``restore-status``: the ledger's progress and forecast as artifacts.

Each stage of each host runs as one task ("wipe ws-icu-arl-001"): a host takes nothing while it
waits, and 1,700 hosts make about 7,000 task runs, under the 10,000 nodes the UI draws. A flow run
re-run after a crash (same flow run id) continues its ledger run: same approvals, same leases, and
every host resumes from its recorded state.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from enum import StrEnum
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import State, StateType
from prefect.exceptions import FailedRun, FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.futures import PrefectFuture, wait
from prefect.input import RunInput
from prefect.states import Completed, Crashed, Failed, Running
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field, create_model

from restore_flows.bootstrap import Context, live_fleet, load_and_sync, open_ledger
from restore_flows.drivers.base import Fleet
from restore_flows.drivers.fake import rehearsal_fleet
from restore_flows.execution.campaign import (
    STEP_SCOPE,
    Automatic,
    Campaign,
    CampaignSettings,
    Executor,
    RunSummary,
    Selection,
    Status,
    WaveToApprove,
)
from restore_flows.execution.eta import estate_status, format_minutes
from restore_flows.flows.progress import RunProgress, summary_markdown
from restore_flows.ledger.records import RunRecord
from restore_flows.planning import Plan
from restore_flows.scheduling.clock import Outcome, Result
from restore_flows.scheduling.scheduler import Start
from restore_flows.settings import Settings


class _RefusalsEndCleanly(logging.Filter):
    """A run this module ends Failed on purpose (refused, not approved, hosts failed) makes Prefect's
    engine log "Engine execution exited with unexpected exception" and its traceback: to people it
    reads as a crash. Keep the line, with the run's own words and without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FailedRun):
            record.msg = "the run ended Failed: %s"
            record.args = (record.exc_info[1],)
            record.exc_info = None
            record.exc_text = None
        return True


# At import: the served flow's process imports this module before its engine runs the flow.
logging.getLogger("prefect.flow_runs").addFilter(_RefusalsEndCleanly())

MAX_STAGES_AT_ONCE = 1024
"""Threads of the flows' task runner: how many stages may *run* at once. Waiting takes no thread, and
the pools allow far fewer running stages than this: it is a safety net, not a schedule limit."""


class Mode(StrEnum):
    REHEARSAL = "rehearsal"
    LIVE = "live"


class _Common(BaseModel):
    mode: Mode = Field(
        default=Mode.REHEARSAL,
        description="rehearsal: the simulated fleet and the rehearsal ledger. live: real machines.",
    )
    ask_approval: bool = Field(
        default=False,
        description="Rehearsal: pause for the approval form as a live run does (live always asks).",
    )
    approval_timeout_minutes: float = Field(
        default=240.0, gt=0, description="How long to wait for approval; then nothing more is wiped."
    )
    time_scale: float = Field(
        default=0.0,
        ge=0,
        description="Rehearsal: real seconds per simulated minute, divided by 60 (0: instant).",
    )
    fail_rate: float = Field(default=0.0, ge=0, le=1, description="Rehearsal: failure rate of every stage.")
    duration_noise: float = Field(
        default=0.0, ge=0, le=0.9, description="Rehearsal: each stage takes its time x (1 +- this)."
    )
    seed: int = Field(default=0, description="Rehearsal: seed of the injected failures and noise.")
    broken_hosts: list[str] = Field(
        default_factory=list, description="Rehearsal drill: these hosts fail their wipe every time."
    )
    site_workers: bool = Field(
        default=False,
        description=(
            "Run each host's stages on its site's worker (restore worker SITE), from the site's network; "
            "this run only schedules. A site without a worker waits; the others go on."
        ),
    )


class WaveParameters(_Common):
    """What the ops engineer chooses in the Run form of restore-wave."""

    wave: str = Field(description="The wave to restore.")
    sites: list[str] = Field(default_factory=list, description="Only these sites (empty: every site).")
    hosts: list[str] = Field(default_factory=list, description="Only these hosts (empty: the whole wave).")


class EstateParameters(_Common):
    """What the ops engineer chooses in the Run form of restore-estate."""

    waves: list[str] = Field(
        default_factory=list, description="Only these waves (empty: every wave), all scheduled at once."
    )


@task(cache_policy=NO_CACHE, retries=0, task_run_name="{label}")
def run_stage(label: str, work: Callable[[], Outcome]) -> str:
    """One stage of one host; the runner retries stages itself, with the ledger's blessing."""
    outcome = work()
    if outcome.result in (Result.FAILED, Result.STUCK):
        get_run_logger().warning("%s: %s", label, outcome.error)
    return outcome.result.value


class PrefectExecutor:
    """Each stage as a Prefect task run. A task run that ends without running the stage (seen under
    load: 'Pending' without ever starting) reports the stage as not started, to be started again."""

    def __init__(self) -> None:
        self._futures: list[PrefectFuture[str]] = []
        self._lock = threading.Lock()

    def submit(self, start: Start, work: Callable[[], Outcome], deliver: Callable[[Outcome], None]) -> None:
        reported = threading.Event()

        def report() -> Outcome:
            outcome = work()
            reported.set()
            deliver(outcome)
            return outcome

        def check(future: PrefectFuture[str]) -> None:
            if not reported.is_set():
                deliver(Outcome(start.host, Result.MOVED, None, error=f"task run ended {future.state.name}"))

        label = f"{start.stage.value} {start.host}"
        # quote(): hand the callable over as it is; Prefect would otherwise walk and rebuild it.
        future = run_stage.submit(label, cast(Any, quote(report)))
        future.add_done_callback(check)
        with self._lock:
            self._futures.append(future)

    def close(self) -> None:
        with self._lock:
            futures = list(self._futures)
        wait(futures)  # let the last task runs record their final state before the flow ends


def approval_form(waves: Sequence[WaveToApprove], *, several: bool = False) -> type[RunInput]:
    """The Resume form: the approver's name and the wave's name typed again; for a campaign
    (``several``), the waves approved now and their names typed again. What will be wiped is the
    form's own description, shown as markdown at the top of the Resume dialog."""
    names = [w.wave for w in waves]
    shown = "\n\n".join(as_markdown(w.summary) for w in waves)
    approver = (
        str,
        Field(min_length=1, description="Your full name. It is recorded in the ledger as the approver."),
    )
    described = f"**Approval needed: {', '.join(names)}**\n\n{shown}"
    # No field data given to with_initial_data: the fields keep their descriptions and bounds.
    if len(names) == 1 and names[0].startswith(STEP_SCOPE):
        step = names[0].removeprefix(STEP_SCOPE)
        one_step = create_model(
            "StepApproval",
            __base__=RunInput,
            approver=approver,
            confirm_wave=(
                str,
                Field(min_length=1, description=f"Type the step's name, {step}, to run it now."),
            ),
        )
        return one_step.with_initial_data(description=described)
    if not several:
        one = create_model(
            "WaveApproval",
            __base__=RunInput,
            approver=approver,
            confirm_wave=(
                str,
                Field(
                    min_length=1,
                    description=f"Type the wave's name, {names[0]}, to approve wiping the hosts above.",
                ),
            ),
        )
        return one.with_initial_data(description=described)
    choice: Any = Literal.__getitem__(tuple(names))
    several_at_once = create_model(
        "WavesApproval",
        __base__=RunInput,
        approver=approver,
        waves=(
            list[choice],
            Field(min_length=1, description="The waves you approve now; the others keep waiting."),
        ),
        confirm_waves=(
            str,
            Field(min_length=1, description="Type the names of the waves you approve, separated by commas."),
        ),
    )
    return several_at_once.with_initial_data(description=described)


class FormApprover:
    """Asks in the Prefect UI (the run's Resume form), from a thread of its own, so that approved waves
    run while the others wait; asks again for what is left, until approved or timed out."""

    automatic = False

    def __init__(self, timeout_minutes: float, *, several: bool = False) -> None:
        self._timeout = timeout_minutes
        self._several = several
        self._approved: dict[str, str] = {}
        self._refused: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._queue: list[WaveToApprove] = []
        """Asked while a form is open (a step due later): asked next, one form at a time."""

    def ask(self, waves: Sequence[WaveToApprove]) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and not self._done.is_set():
                self._queue += waves
                return
            self._done.clear()
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._ask_all, list(waves)), name="approval", daemon=True
        )
        self._thread.start()

    def poll(self) -> tuple[dict[str, str], dict[str, str]]:
        with self._lock:
            approved, refused = self._approved, self._refused
            self._approved, self._refused = {}, {}
        return approved, refused

    def pending(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def _next(self, left: list[WaveToApprove]) -> list[WaveToApprove]:
        """What is still to ask: a step is asked on its own form, waves together."""
        with self._lock:
            if not left and self._queue:
                left, self._queue = self._queue, []
            if not left:
                self._done.set()  # under the lock: a later ask() starts a new thread
            return left

    def _ask_all(self, waves: list[WaveToApprove]) -> None:
        logger = get_run_logger()
        left = list(waves)
        link = run_link()
        try:
            while left := self._next(left):
                steps = [w for w in left if w.wave.startswith(STEP_SCOPE)]
                later = [w for w in left if w not in steps[:1]] if steps else []
                if steps:
                    left = steps[:1]
                    with self._lock:
                        self._queue = later + self._queue
                names = ", ".join(w.wave for w in left)
                # Say where the form is, in the log and in an artifact: the UI that 'restore up' serves
                # has a Resume button at the top of the run page; the newer one has it under ⋮ only.
                logger.warning(
                    "approval needed for wave(s) %s: open %s and press Resume (top right; in the newer "
                    "UI: ⋮ → Resume)",
                    names,
                    link,
                )
                create_markdown_artifact(
                    f"# Approval needed: {names}\n\n"
                    f"Open [this flow run]({link}), then press **Resume** at the top right (in the newer "
                    "UI: **⋮ → Resume**): type your name and the wave's name. Nothing is wiped before.\n\n"
                    + "\n\n".join(as_markdown(w.summary) for w in left)
                    + "\n",
                    key="approval-needed",
                    description=f"Approval needed: {names}",
                )
                form = approval_form(left, several=self._several)
                try:
                    answer: Any = pause_flow_run(
                        wait_for_input=form, timeout=int(self._timeout * 60), poll_interval=2
                    )
                except FlowPauseTimeout:
                    with self._lock:
                        self._refused.update(
                            {
                                w.wave: f"no approval within {self._timeout:g} minutes: {_untouched(w)}"
                                for w in left
                            }
                        )
                    _back_to_running()
                    left = []  # what was asked later is still asked
                    continue
                chosen = _chosen(answer, [w.wave for w in left])
                if chosen is None:
                    typed = getattr(answer, "confirm_wave", None) or getattr(answer, "confirm_waves", "")
                    with self._lock:
                        self._refused.update(
                            {
                                w.wave: f"approval refused: the {_typed(w)} typed as {typed!r}; "
                                + _untouched(w)
                                for w in left
                            }
                        )
                    left = []
                    continue
                approver = answer.approver.strip()
                logger.info("approved by %s: %s", approver, ", ".join(chosen))
                with self._lock:
                    self._approved.update(dict.fromkeys(chosen, approver))
                left = [w for w in left if w.wave not in chosen]
        finally:
            self._done.set()


def run_link() -> str:
    """This flow run's page in the UI (where its Resume dialog is)."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value() or ""
    return f"{base.rstrip('/')}/flow-runs/flow-run/{runtime.flow_run.id}"


def as_markdown(summary: str) -> str:
    """An approval summary as markdown, which the form and the artifact render: the UI that ``restore
    up`` serves shows a field's description as markdown, so the hosts to be wiped read as a list per
    site and kind. Every line is set apart by a blank line: the form keeps only double line breaks
    (the newer UI shows the same text on one line, still readable)."""
    return "\n\n".join(line.strip() for line in summary.splitlines() if line.strip())


def _typed(asked: WaveToApprove) -> str:
    return "step's name was" if asked.wave.startswith(STEP_SCOPE) else "wave names were"


def _untouched(asked: WaveToApprove) -> str:
    if asked.wave.startswith(STEP_SCOPE):
        return f"step {asked.wave.removeprefix(STEP_SCOPE)} was not run"
    return f"nothing was wiped in wave {asked.wave}"


def _chosen(answer: Any, offered: list[str]) -> list[str] | None:
    """The waves an answer approves, if the names typed match what was chosen (a step's name is
    typed without its 'step:' scope)."""
    if hasattr(answer, "confirm_wave"):
        typed = answer.confirm_wave.strip()
        return offered if typed in (offered[0], offered[0].removeprefix(STEP_SCOPE)) else None
    chosen = [w for w in offered if w in set(answer.waves)]
    typed = {part.strip() for part in answer.confirm_waves.split(",") if part.strip()}
    return chosen if typed == set(chosen) else None


def _back_to_running() -> None:
    """After a pause that timed out, the run goes on for the waves already approved."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(runtime.flow_run.id, Running(), force=True)


def _fleet(settings: Settings, params: _Common, stack: ExitStack, estate: Any) -> Fleet:
    if params.mode is Mode.REHEARSAL:
        return rehearsal_fleet(params)
    return stack.enter_context(live_fleet(settings, estate))


def _run(params: _Common, selection: Selection, scope: str, *, several: bool = False) -> State[Any]:
    settings = Settings()
    rehearsal = params.mode is Mode.REHEARSAL
    # Only a rehearsal ledger is migrated by a run; the live one is migrated by an operator.
    with open_ledger(settings, rehearsal=rehearsal, migrate=rehearsal) as context, ExitStack() as stack:
        estate, the_plan, _ = load_and_sync(context, settings.inventory)
        try:
            hosts = selection.resolve(the_plan)
        except ValueError as exc:
            return Failed(message=str(exc))
        ledger = context.ledger
        _close_dead_flow_runs(ledger.reap())
        flow_run_id = str(runtime.flow_run.id)
        run_id = ledger.run_for(flow_run_id)
        if run_id is None:
            run_id = ledger.start_run(params.mode.value, scope, "prefect", external_id=flow_run_id)
        else:
            get_run_logger().info("resuming ledger run %s of this flow run", run_id)
        progress = RunProgress(context, the_plan, hosts, time_scale=params.time_scale)
        create_markdown_artifact(
            f"[The managers' live view]({settings.dashboard_url(rehearsal)}) (served by `restore up`): "
            "per wave, site and department, what is online, what blocks it, and when it will be back.\n",
            key="manager-view",
            description="Live progress for managers",
        )
        approver = (
            Automatic()
            if rehearsal and not params.ask_approval
            else FormApprover(params.approval_timeout_minutes, several=several)
        )
        campaign = Campaign(
            ledger,
            the_plan,
            _fleet(settings, params, stack, estate),
            selection,
            run_id=run_id,
            actor="prefect",
            executor=_executor(params, context, the_plan, hosts),
            approver=approver,
            settings=_campaign_settings(context.settings, params),
            on_change=progress.changed,
            on_poll=lambda _campaign: progress.tick(),
        )
        with progress:
            summary = campaign.run()
        outcome = _outcome(summary)
        ledger.finish_run(run_id, outcome)
        progress.finish(summary)
        create_markdown_artifact(
            summary_markdown(scope, summary, the_plan), key="run-summary", description="How the run ended"
        )
        return _state(scope, summary)


def _executor(params: _Common, context: Context, the_plan: Plan, hosts: Sequence[str]) -> Executor:
    """This flow's task runs, or the hosts' site workers (each stage a task run of its site's session)."""
    if not params.site_workers:
        return PrefectExecutor()
    from restore_flows.flows.sites import FleetParameters, SiteExecutor

    settings = context.settings
    rehearsal = params.mode is Mode.REHEARSAL
    executor = SiteExecutor(
        context.ledger,
        settings.ledger_url(rehearsal=rehearsal),
        rehearsal=rehearsal,
        fleet=FleetParameters(
            params.time_scale,
            params.fail_rate,
            params.duration_noise,
            params.seed,
            tuple(params.broken_hosts),
        ),
        silent_seconds=settings.site_silent_seconds,
        threads=settings.site_session_threads,
        session_patience=settings.site_session_patience_seconds,
    )
    return executor.open({the_plan.estate.hosts[n].site for n in hosts})


def _close_dead_flow_runs(gone: Sequence[RunRecord]) -> None:
    """A ledger run whose process died left its flow run (and its task runs) 'Running' in Prefect for
    ever: say what became of it. Their hosts are taken over by whichever run wants them next."""
    here = str(runtime.flow_run.id)
    with get_client(sync_client=True) as client:
        for run in gone:
            if not run.external_id or run.external_id == here:
                continue
            try:
                flow_run = client.read_flow_run(UUID(run.external_id))
            except Exception:  # not a flow run of this server (another server, deleted): nothing to say
                continue
            if flow_run.state is None or flow_run.state.is_final():
                continue
            message = f"its process is gone (ledger run {run.id} {run.outcome or 'lost'}); hosts taken over"
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            running = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(
                        type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                    )
                ),
            )
            for task_run in running:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            get_run_logger().warning("flow run %s: %s", flow_run.name, message)


def _campaign_settings(settings: Settings, params: _Common) -> CampaignSettings:
    rehearsal = params.mode is Mode.REHEARSAL
    return CampaignSettings.from_settings(settings, pace=params.time_scale if rehearsal else 1.0)


def _outcome(summary: RunSummary) -> str:
    if summary.ok:
        return "completed"
    if summary.refused and summary.count(Status.ONLINE) == 0:
        return "not approved"
    return "failed"


def _state(scope: str, summary: RunSummary) -> State[Any]:
    if summary.ok and summary.stages_started == 0:
        return Completed(
            message=f"{scope}: nothing to do, all {len(summary.hosts)} host(s) were online already"
        )
    if summary.ok:
        return Completed(message=f"{scope}: all {len(summary.hosts)} host(s) online")
    counts = (
        f"{summary.count(Status.FAILED)} failed, {summary.count(Status.BLOCKED)} blocked, "
        f"{summary.count(Status.ONLINE)} online"
    )
    if summary.refused:
        reasons = "; ".join(summary.refused.values())
        moved = summary.count(Status.ONLINE) or summary.count(Status.FAILED)
        return Failed(message=reasons + (f" ({scope}: {counts})" if moved else ""))
    return Failed(message=f"{scope}: {counts}")


def _task_runner() -> TaskRunner[Any]:
    return cast("TaskRunner[Any]", ThreadPoolTaskRunner(max_workers=MAX_STAGES_AT_ONCE))


@flow(name="restore-wave", task_runner=_task_runner(), log_prints=False, validate_parameters=True)
def restore_wave(params: WaveParameters) -> State[Any]:
    """Restore one wave: approval, then every host through wipe, rebuild, verify and release."""
    selection = Selection((params.wave,), tuple(params.sites), tuple(params.hosts))
    return _run(params, selection, f"wave {params.wave}")


@flow(name="restore-estate", task_runner=_task_runner(), log_prints=False, validate_parameters=True)
def restore_estate(params: EstateParameters) -> State[Any]:
    """Every chosen wave at once, each with its own approval: a campaign, not a sequence."""
    waves = tuple(params.waves)
    scope = "campaign" + (f" ({', '.join(waves)})" if waves else "")
    return _run(params, Selection(waves), scope, several=True)


class StatusParameters(BaseModel):
    mode: Mode = Field(default=Mode.LIVE, description="Which ledger to report on: live or rehearsal.")


@flow(name="restore-status", log_prints=False)
def restore_status(params: StatusParameters) -> State[Any]:
    """The ledger's progress as artifacts: estate progress, and per wave online %, states and ETA."""
    settings = Settings()
    rehearsal = params.mode is Mode.REHEARSAL
    with open_ledger(settings, rehearsal=rehearsal) as context:
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
            "ETA": format_minutes(group["eta_minutes"]),
        }
        for name, group in report["waves"].items()
    ]
    create_table_artifact(rows, key="estate-status", description="Per wave: online, total, ETA")
    return Completed(message=f"{report['estate']['percent']}% of the estate online")
