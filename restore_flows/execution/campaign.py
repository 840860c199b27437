"""The one runner of a restore: some or all waves at once, every stage as soon as its dependencies, its
wave's approval and its pools allow. CLI, rehearsals, the Prefect flows and the tests all run this.

How a stage is executed (threads here, Prefect tasks in the flows) and how approvals are asked
(automatically for rehearsals, a name on the command line, the Prefect form) are injected. The
scheduler decides; :class:`LedgerWorld` tells it what changes outside this run (hosts of other runs,
approvals, pool slots other runs hold); :class:`~restore_flows.execution.stages.StageRunner` does each
stage through the ledger.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from restore_flows.drivers.base import Fleet
from restore_flows.execution.eta import as_utc, learned_durations
from restore_flows.execution.procedures import StepResult, StepRunner
from restore_flows.execution.stages import StageResult, StageRunner
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage
from restore_flows.inventory.procedures import split_milestone
from restore_flows.ledger.pools import Request
from restore_flows.ledger.records import RunRecord
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.steps import approval_scope
from restore_flows.planning import Plan
from restore_flows.scheduling.clock import Outcome, RealClock, Result
from restore_flows.scheduling.durations import Durations
from restore_flows.scheduling.priority import Priorities, PriorityPolicy
from restore_flows.scheduling.runner import Retries, run
from restore_flows.scheduling.scheduler import CAMPAIGN, Policy, Scheduler, Start
from restore_flows.scheduling.scheduler import Status as Sched
from restore_flows.scheduling.work import (
    Job,
    ProcedureStage,
    jobs_for,
    milestone_facts,
    milestone_reached,
    remaining_stages,
    steps_for,
)
from restore_flows.settings import Settings
from restore_flows.states import FINAL, STEP_STUCK, STUCK, HostState, StepState

log = logging.getLogger(__name__)

STEP_SCOPE = approval_scope("")
"""How a step's approval is asked for and recorded: 'step:NAME' (a wave's is its name)."""


class Status(StrEnum):
    """What managers read about a host in a run."""

    PENDING = "pending"
    WAITING = "waiting"
    RUNNING = "running"
    ONLINE = "online"
    FAILED = "failed"
    BLOCKED = "blocked"


@dataclass
class HostProgress:
    host: str
    wave: str
    site: str
    department: str
    status: Status = Status.PENDING
    state: HostState = HostState.COMPROMISED
    reason: str | None = None
    error: str | None = None
    stage: str | None = None


@dataclass
class StepProgress:
    """A procedure step in a run, for the managers' view: ``ONLINE`` means done."""

    step: str
    wave: str
    status: Status = Status.PENDING
    state: StepState = StepState.PENDING
    reason: str | None = None
    error: str | None = None


@dataclass
class RunSummary:
    hosts: dict[str, HostProgress]
    elapsed_seconds: float
    refused: dict[str, str] = field(default_factory=dict)
    """Waves (and steps, 'step:NAME') not approved, with why: nothing of them was done."""
    stages_started: int = 0
    steps: dict[str, StepProgress] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(p.status is Status.ONLINE for p in self.hosts.values()) and all(
            p.status is Status.ONLINE for p in self.steps.values()
        )

    def count(self, status: Status) -> int:
        return sum(1 for p in self.hosts.values() if p.status == status)

    def failed(self) -> list[HostProgress]:
        return [p for p in self.hosts.values() if p.status is Status.FAILED]

    def blocked(self) -> list[HostProgress]:
        return [p for p in self.hosts.values() if p.status is Status.BLOCKED]

    def wave(self, name: str) -> list[HostProgress]:
        return [p for p in self.hosts.values() if p.wave == name]


@dataclass(frozen=True)
class Selection:
    """Which hosts a run restores: some waves (all by default), optionally narrowed."""

    waves: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()

    def resolve(self, the_plan: Plan) -> list[str]:
        """The chosen hosts in plan order; unknown waves or hosts are an error."""
        known = [w.name for w in the_plan.waves]
        unknown = [w for w in self.waves if w not in known]
        if unknown:
            raise ValueError(f"no wave named {unknown[0]!r} (waves: {', '.join(known)})")
        waves = [w for w in the_plan.waves if not self.waves or w.name in self.waves]
        names = [n for w in waves for n in w.hosts]
        if self.sites:
            # A mistyped site would otherwise select nothing and the run would say "nothing to do".
            sites = sorted(the_plan.estate.sites)
            strange = [s for s in self.sites if s not in the_plan.estate.sites]
            if strange:
                raise ValueError(f"no site named {strange[0]!r} (sites: {', '.join(sites)})")
            names = [n for n in names if the_plan.estate.hosts[n].site in self.sites]
        if self.hosts:
            inside = set(names)
            missing = sorted(set(self.hosts) - inside)
            if missing:
                raise ValueError(f"not in the chosen waves: {', '.join(missing)}")
            wanted = set(self.hosts)
            names = [n for n in names if n in wanted]
        return names

    def steps(self, the_plan: Plan) -> list[str]:
        """The procedure steps the run does: those of the chosen waves (none when hosts are named:
        such a run restores those hosts, it does not reset the forest's credentials)."""
        if self.hosts:
            return []
        return [n for n, planned in the_plan.steps.items() if not self.waves or planned.wave in self.waves]


@dataclass(frozen=True)
class WaveToApprove:
    wave: str
    hosts: tuple[str, ...]
    """What this run would wipe in it (hosts not yet clean)."""
    summary: str


class Approver(Protocol):
    """How a run's waves get their approval. ``ask`` is called once with every wave that needs one;
    ``poll`` returns, at any later time, the waves newly approved (wave -> approver's name) and the
    waves that will not be (wave -> why). Destructive work of a wave starts only once approved."""

    automatic: bool
    """Approvals it gives are recorded as automatic (rehearsals)."""

    def ask(self, waves: Sequence[WaveToApprove]) -> None: ...

    def poll(self) -> tuple[dict[str, str], dict[str, str]]: ...

    def pending(self) -> bool:
        """Whether an answer may still come."""
        ...


class Automatic:
    """Rehearsals: every wave approved at once, recorded as automatic."""

    name = "automatic (rehearsal)"
    automatic = True

    def __init__(self) -> None:
        self._waves: list[str] = []

    def ask(self, waves: Sequence[WaveToApprove]) -> None:
        # A run asks again later for a step due (named approval): keep what is not answered yet.
        self._waves += [w.wave for w in waves]

    def poll(self) -> tuple[dict[str, str], dict[str, str]]:
        approved = dict.fromkeys(self._waves, self.name)
        self._waves = []
        return approved, {}

    def pending(self) -> bool:
        return bool(self._waves)


class Named(Automatic):
    """A named person approved every wave beforehand (``restore run --approver``)."""

    automatic = False

    def __init__(self, approver: str, steps: Iterable[str] = ()) -> None:
        super().__init__()
        self.name = approver
        self.steps = set(steps)
        """The steps needing a named approval that this person approved (``--approve-step``)."""

    def poll(self) -> tuple[dict[str, str], dict[str, str]]:
        approved, _ = super().poll()
        refused: dict[str, str] = {}
        for scope in list(approved):
            step = scope.removeprefix(STEP_SCOPE)
            if scope.startswith(STEP_SCOPE) and step not in self.steps:
                del approved[scope]
                refused[scope] = f"step {step} needs a named approval: run again with --approve-step {step}"
        return approved, refused


def approval_summary(
    the_plan: Plan, hosts: Sequence[str], ledger: Ledger, wave: str | None = None, run_id: str | None = None
) -> str:
    """What an approver is shown before a wave's first wipe: counts per site and kind, what is online
    already, hosts another live run holds, forensic holds and whether their evidence is in."""
    estate = the_plan.estate
    states = ledger.states(hosts)
    online = [n for n in hosts if states.get(n) is HostState.ONLINE]
    todo = [n for n in hosts if states.get(n) is not HostState.ONLINE]
    per = Counter((estate.hosts[n].site, estate.hosts[n].kind.value) for n in todo)
    title = f"Wave {wave}: " if wave else ""
    lines = [f"{title}{len(todo)} host(s) will be wiped and rebuilt:"]
    lines += [f"- {site}: {count} {kind}(s)" for (site, kind), count in sorted(per.items())]
    if online:
        lines.append(f"{len(online)} host(s) of it are online already: nothing is done to them.")
    leases = ledger.leases()
    holders = Counter(leases[n][0] for n in todo if n in leases and leases[n][0] != run_id)
    for holder, count in sorted(holders.items()):
        if ledger.run(holder).alive:
            lines.append(
                f"WARNING: {count} host(s) of it are held by another run, {holder}, still alive: "
                "they are waited for, not touched, until it lets them go."
            )
    steps = [n for n, planned in the_plan.steps.items() if wave is not None and planned.wave == wave]
    if steps:
        lines.append("Procedure steps run with this wave, each once, when what it needs is done:")
        for name in steps:
            step = estate.procedures[name]
            extra = [f"{w.minutes / 60:g} h after {w.step}" for w in step.waits]
            if step.approval:
                extra.append("asks its own named approval when due")
            lines.append(f"- {name}" + (f" ({'; '.join(extra)})" if extra else ""))
    held = [n for n in todo if estate.hosts[n].forensic_hold]
    if held:
        evidence = ledger.with_evidence()
        lines.append("Under forensic hold:")
        lines += [f"- {n}: evidence {'registered' if n in evidence else 'NOT yet registered'}" for n in held]
    return "\n".join(lines)


def step_summary(the_plan: Plan, name: str) -> str:
    """What an approver is shown before a step that needs a named approval."""
    step = the_plan.estate.procedures[name]
    lines = [f"Step {name}: {step.description or 'no description'}"]
    if step.target_hosts:
        lines.append(f"- runs on: {', '.join(step.target_hosts)}")
    if step.generates:
        lines.append(f"- generates new secrets: {', '.join(step.generates)} (only fingerprints are kept)")
    for wait in step.waits:
        lines.append(f"- no sooner than {wait.minutes / 60:g} h after {wait.step}: {wait.reason}")
    if not step.repeatable:
        lines.append("- it runs once: it is never run again unless an operator re-arms it")
    return "\n".join(lines)


class Executor(Protocol):
    """Runs a stage somewhere (a thread, a Prefect task) and reports its outcome, always."""

    def submit(
        self, start: Start, work: Callable[[], Outcome], deliver: Callable[[Outcome], None]
    ) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StageOrder:
    """A stage for an executor that runs it in another process (a site's worker), which cannot be handed
    the in-process ``work``: what that process needs, and how its result becomes the scheduler's."""

    start: Start
    host: Host
    run_id: str
    claims: Callable[[], tuple[int, ...]]
    """The pool claims granted for the stage, handed over (the remote stage gives them back)."""
    outcome: Callable[[StageResult], Outcome]


class RemoteExecutor(Executor, Protocol):
    """An executor whose stages run their own :class:`StageRunner` elsewhere, on the same ledger."""

    def submit_order(self, order: StageOrder, deliver: Callable[[Outcome], None]) -> None: ...


class ThreadExecutor:
    """Stages on a thread pool. Its size bounds only how many stages *run* at once (waiting costs no
    thread); it is a safety net far above what the pools allow, not a schedule limit."""

    def __init__(self, max_workers: int = 512) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="stage")

    def submit(self, start: Start, work: Callable[[], Outcome], deliver: Callable[[Outcome], None]) -> None:
        def task() -> None:
            deliver(work())

        self._pool.submit(task)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class CampaignSettings:
    lease_seconds: float = 300.0
    heartbeat_seconds: float = 5.0
    """How often the run tells the ledger it is alive (and renews its leases and pool claims)."""
    retries: Retries = field(default_factory=Retries)
    poll_seconds: float = 0.5
    """How often the ledger is looked at for what changes outside the run."""
    dependency_timeout: float = 3600.0
    """How long a host waits for a dependency outside the run that does not come online."""
    policy: Policy = CAMPAIGN
    priority: PriorityPolicy = PriorityPolicy.LOOKAHEAD
    pace: float = 1.0
    """Real minutes per planned minute until stages have been observed (a rehearsal's time scale)."""

    @classmethod
    def from_settings(cls, settings: Settings, pace: float = 1.0) -> CampaignSettings:
        """For a run: the operator's settings; ``pace``: a rehearsal's time scale (back-offs and
        durations shrink with it, so a rehearsal keeps the shape of the real thing)."""
        backoff = tuple(seconds / 60 * (pace if pace > 0 else 0.0) for seconds in (1.0, 5.0, 15.0))
        return cls(
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            retries=Retries(attempts=settings.stage_attempts, backoff_minutes=backoff),
            pace=pace,
        )


class Campaign:
    def __init__(
        self,
        ledger: Ledger,
        the_plan: Plan,
        fleet: Fleet,
        selection: Selection,
        *,
        run_id: str,
        actor: str,
        executor: Executor,
        approver: Approver,
        settings: CampaignSettings | None = None,
        on_change: Callable[[HostProgress], None] = lambda progress: None,
        on_poll: Callable[[Campaign], None] = lambda campaign: None,
    ) -> None:
        self.ledger = ledger
        self.plan = the_plan
        self.fleet = fleet
        self.run_id = run_id
        self.actor = actor
        self.settings = settings or CampaignSettings()
        self.executor = executor
        self.approver = approver
        self.on_change = on_change
        self.on_poll = on_poll
        self.hosts = selection.resolve(the_plan)
        self.steps = selection.steps(the_plan)
        self.progress: dict[str, HostProgress] = {}
        self.step_progress: dict[str, StepProgress] = {}
        self._lock = threading.Lock()

    def _origin(self) -> float:
        """Minute 0 of this run on a clock every run of the ledger shares (from its first run, in
        planned minutes: a rehearsal's time scale applied), so that the pool claims of runs started
        at different times compare."""
        first = self.ledger.first_run_at()
        if first is None or self.settings.pace <= 0:
            return 0.0
        return (dt.datetime.now(dt.UTC) - first).total_seconds() / 60.0 / self.settings.pace

    def run(self) -> RunSummary:
        started = time.monotonic()
        estate = self.plan.estate
        # This process runs the run now (it may be a flow run re-run after its process died), and owns
        # no pool slot yet: any the run has were left by that process, whose stages are gone.
        self.ledger.adopt_run(self.run_id)
        self.ledger.slots.release_run(self.run_id)
        for gone in self.ledger.reap():
            log.warning("run %s (%s) is gone: its hosts will be taken over", gone.id, gone.scope)
        states = self.ledger.states()
        evidence = self.ledger.with_evidence()
        durations = learned_durations(self.ledger, self.plan, self.settings.pace)
        every = [n for w in self.plan.waves for n in w.hosts]
        all_jobs, stuck = jobs_for(self.plan, every, states, evidence, durations)
        jobs = {n: all_jobs[n] for n in self.hosts if n in all_jobs}
        step_jobs, stuck_steps, done_steps, done_at = self._step_work(durations)
        all_jobs.update(step_jobs)
        jobs.update({n: step_jobs[n] for n in self.steps if n in step_jobs})
        wave_index = {w.name: i for i, w in enumerate(self.plan.waves)}
        self.progress = {n: self._new_progress(n, states.get(n, HostState.COMPROMISED)) for n in self.hosts}
        self.step_progress = {n: StepProgress(n, self.plan.steps[n].wave) for n in self.steps}
        online = {n for n, s in states.items() if s is FINAL} | done_steps
        reached, unreachable = milestone_facts(self.plan, jobs, states)
        online |= reached
        capacities = {name: pool.capacity for name, pool in estate.pools.items()}
        priorities = Priorities(
            self.plan,
            all_jobs,
            self.settings.priority,
            capacities=capacities,
            online=online,
            done_at=done_at,
            origin=self._origin(),
        )
        to_approve = self._waves_to_approve(jobs, online)
        scheduler = Scheduler(
            jobs,
            priorities,
            capacities,
            online=online,
            approved={wave_index[w] for w in {self.plan.wave_of(n) for n in jobs}}
            - {wave_index[w.wave] for w in to_approve},
            policy=self.settings.policy,
            stuck={
                **{n: f"is {s.value}" for n, s in stuck.items() if n not in jobs},
                **{n: why for n, why in stuck_steps.items() if n not in jobs},
                **unreachable,
            },
            steps=self.plan.steps,
            done_at=done_at,
            approved_steps=self.ledger.steps.approved(self.run_id),
        )
        self._first_progress(scheduler, stuck, stuck_steps, done_steps)
        runner = StageRunner(
            self.ledger,
            self.fleet,
            self.run_id,
            self.actor,
            self.settings.lease_seconds,
            on_change=self._state_changed,
        )
        world = LedgerWorld(self, scheduler, jobs, wave_index, to_approve)
        clock = RealClock()
        scheduler.time_label = _wall_clock(clock)
        steps = StepRunner(self.ledger, self.fleet, self.run_id, self.actor, self.plan.estate.procedures)
        starter = _Starter(self, runner, steps, jobs, clock, world)
        heart = _Heartbeat(
            self.ledger, self.run_id, self.settings.lease_seconds, self.settings.heartbeat_seconds
        )
        heart.start()
        if to_approve:
            self.approver.ask(to_approve)
        try:
            run(
                scheduler,
                clock,
                starter,
                world,
                retries=self.settings.retries,
                observer=_Progress(self, scheduler, runner),
            )
        finally:
            heart.stop()
            self.executor.close()
        for name in scheduler.unfinished():
            self._set(name, Status.BLOCKED, reason=scheduler.why(name))
        for name, status in scheduler.status.items():
            item: HostProgress | StepProgress = self.progress.get(name) or self.step_progress[name]
            if status is Sched.BLOCKED and item.status is not Status.BLOCKED:
                self._set(name, Status.BLOCKED, reason=scheduler.dead.get(name))
            elif status is Sched.DONE and item.status is not Status.ONLINE:
                self._set(name, Status.ONLINE, state=FINAL)
        return RunSummary(
            dict(self.progress),
            time.monotonic() - started,
            dict(world.refused),
            starter.count,
            {n: replace(p) for n, p in self.step_progress.items()},
        )

    def _first_progress(
        self,
        scheduler: Scheduler,
        stuck: Mapping[str, HostState],
        stuck_steps: Mapping[str, str],
        done_steps: set[str],
    ) -> None:
        for name, state in stuck.items():
            if name in self.progress:
                self._set(name, Status.FAILED, state=state, error=f"needs an operator: host is {state.value}")
        for name, why in stuck_steps.items():
            if name in self.step_progress:
                self._set(name, Status.FAILED, error=f"needs an operator: step {why}")
                # Said at the start of every run that finds it so, not only the one that found it
                # interrupted: the operator reading this run's log learns what to do at once.
                log.warning(
                    "step %s needs an operator: %s (restore decide rearm|done_by_hand %s)", name, why, name
                )
        for name in done_steps & set(self.step_progress):
            self._set(name, Status.ONLINE)
        for name in scheduler.jobs:
            if scheduler.status[name] is Sched.DONE:
                self._set(name, Status.ONLINE, state=FINAL)

    def _step_work(
        self, durations: Durations
    ) -> tuple[dict[str, Job], dict[str, str], set[str], dict[str, float]]:
        """Every procedure step's job from the ledger (a step a dead run was running is interrupted
        first: it may have run), the steps that wait for an operator, those done, and when they were
        done (minutes before now: a wait after one counts from there)."""
        if not self.plan.steps:
            return {}, {}, set(), {}
        ledger_steps = self.ledger.steps
        for name in ledger_steps.interrupt_dead(self.actor):
            if (
                self.plan.estate.procedures.get(name) is not None
                and self.plan.estate.procedures[name].repeatable
            ):
                log.warning(
                    "step %s was running in a run that is gone: it is repeatable, it runs again", name
                )
                continue
            log.warning(
                "step %s was running in a run that is gone: it may have run, so it is not run again "
                "until an operator decides",
                name,
            )
        records = ledger_steps.states()
        jobs, stuck, done = steps_for(
            self.plan,
            self.plan.steps,
            {n: r.state for n, r in records.items()},
            durations,
            wait_scale=self.settings.pace,
        )
        now = self.ledger.now()
        done_at = {
            n: -_minutes_between(finished, now)
            for n in done
            if n in records and (finished := records[n].finished_at) is not None
        }
        return jobs, stuck, done, done_at

    # -- progress ----------------------------------------------------------------------------------

    def _new_progress(self, name: str, state: HostState) -> HostProgress:
        host = self.plan.estate.hosts[name]
        return HostProgress(name, self.plan.hosts[name].wave, host.site, host.department, state=state)

    def _set(
        self,
        name: str,
        status: Status,
        *,
        state: HostState | None = None,
        reason: str | None = None,
        error: str | None = None,
        stage: str | None = None,
    ) -> None:
        if name in self.step_progress:
            self._set_step(name, status, reason=reason, error=error)
            return
        with self._lock:
            item = self.progress[name]
            item.status = status
            item.reason = reason
            if state is not None:
                item.state = state
            if error is not None:
                item.error = error
            if stage is not None:
                item.stage = stage
        self.on_change(item)

    def _set_step(self, name: str, status: Status, *, reason: str | None, error: str | None) -> None:
        with self._lock:
            item = self.step_progress[name]
            item.status = status
            item.reason = reason
            if error is not None:
                item.error = error
            if status is Status.ONLINE:
                item.state = StepState.DONE
            elif status is Status.RUNNING:
                item.state = StepState.RUNNING

    def _state_changed(self, host: str, stage: object, state: HostState) -> None:
        with self._lock:
            self.progress[host].state = state

    def _waves_to_approve(self, jobs: Mapping[str, Job], online: set[str]) -> list[WaveToApprove]:
        """Waves with hosts to wipe that this run has no approval for yet (a run resumed after a crash
        keeps the approvals it had)."""
        covered = self.ledger.approved_hosts(self.run_id)
        per_wave: dict[str, list[str]] = {}
        for name in self.hosts:
            if name in jobs and name not in online and jobs[name].steps and name not in covered:
                per_wave.setdefault(self.plan.hosts[name].wave, []).append(name)
        return [
            WaveToApprove(
                wave, tuple(names), approval_summary(self.plan, names, self.ledger, wave, self.run_id)
            )
            for wave, names in per_wave.items()
        ]

    def snapshot(self) -> dict[str, HostProgress]:
        with self._lock:
            return {n: HostProgress(**vars(p)) for n, p in self.progress.items()}

    def step_snapshot(self) -> dict[str, StepProgress]:
        with self._lock:
            return {n: replace(p) for n, p in self.step_progress.items()}


def _minutes_between(then: dt.datetime, now: dt.datetime) -> float:
    return (as_utc(now) - as_utc(then)).total_seconds() / 60.0


def _wall_clock(clock: RealClock) -> Callable[[float], str]:
    """Names a time of the run's clock as the wall clock will show it ('Tue 14:05')."""

    def label(minutes: float) -> str:
        at = dt.datetime.now().astimezone() + dt.timedelta(minutes=minutes - clock.now())
        return at.strftime("%a %H:%M")

    return label


def _uses(scheduler: Scheduler) -> dict[str, tuple[int, int]]:
    return {pool: scheduler.pool_use(pool) for pool in scheduler.capacity}


class _Starter:
    """Starts a scheduled stage on the executor; its result comes back through the clock."""

    def __init__(
        self,
        campaign: Campaign,
        runner: StageRunner,
        steps: StepRunner,
        jobs: Mapping[str, Job],
        clock: RealClock,
        world: LedgerWorld,
    ) -> None:
        self._campaign = campaign
        self._runner = runner
        self._steps = steps
        self._jobs = jobs
        self._clock = clock
        self._world = world
        self.count = 0

    def start(self, start: Start) -> None:
        self.count += 1
        stage = start.stage
        if stage is ProcedureStage.STEP:
            self._campaign._set(start.host, Status.RUNNING)
            self._campaign.executor.submit(
                start, lambda: step_outcome(self._steps.run(start.host), start), self._clock.deliver
            )
            return
        assert isinstance(stage, Stage), stage
        host = self._campaign.plan.estate.hosts[start.host]
        self._campaign._set(start.host, Status.RUNNING, stage=stage.value)

        def work() -> Outcome:
            # The stage takes its slots over from the world, and gives them back as it ends.
            result = self._runner.run(host, stage, lambda: self._world.take_claims(start.host))
            return outcome_of(result, host, self._jobs[start.host], start)

        submit_order = getattr(self._campaign.executor, "submit_order", None)
        if submit_order is not None:  # a RemoteExecutor: the stage runs in another process
            submit_order(
                StageOrder(
                    start,
                    host,
                    self._campaign.run_id,
                    lambda: self._world.take_claims(start.host),
                    lambda result: outcome_of(result, host, self._jobs[start.host], start),
                ),
                self._clock.deliver,
            )
            return
        self._campaign.executor.submit(start, work, self._clock.deliver)


def step_outcome(result: StepResult, start: Start) -> Outcome:
    """What a step's result means to the scheduler."""
    if result.done:
        return Outcome(start.host, Result.DONE, 1)
    if result.held_by is not None:
        return Outcome(start.host, Result.MOVED, None, error=result.error)
    if result.retryable:
        return Outcome(start.host, Result.FAILED, retryable=True, error=result.error)
    return Outcome(start.host, Result.STUCK, error=result.error)


def outcome_of(result: StageResult, host: Host, job: Job, start: Start) -> Outcome:
    """What a stage's result means to the scheduler: where the host is in its job now."""
    if result.state is None:
        return Outcome(start.host, Result.MOVED, None, error=result.held_by)
    if result.gave_up:
        return Outcome(start.host, Result.STUCK, error=result.error)
    state = result.state
    if state is not None and state.value.endswith("_failed"):
        return Outcome(start.host, Result.FAILED, retryable=result.retryable, error=result.error)
    if state in STUCK:
        return Outcome(start.host, Result.STUCK, error=result.error or f"host is {state.value}")
    left = remaining_stages(host, state, has_evidence=True)
    if left is None:
        return Outcome(start.host, Result.STUCK, error=f"host is {state.value}")
    stages = [step.stage for step in job.steps]
    index = len(stages) - len(left)
    if index < 0 or tuple(stages[index:]) != left:
        return Outcome(
            start.host, Result.STUCK, error=f"host is {state.value}, which this run did not plan for"
        )
    result_kind = Result.DONE if index == start.step + 1 else Result.MOVED
    return Outcome(start.host, result_kind, index)


class _Progress:
    """Keeps the managers' view of each host in step with the scheduler."""

    def __init__(self, campaign: Campaign, scheduler: Scheduler, runner: StageRunner) -> None:
        self._campaign = campaign
        self._scheduler = scheduler
        self._runner = runner

    def started(self, start: Start, now: float) -> None:
        pass

    def ended(self, start: Start, outcome: Outcome, now: float) -> None:
        campaign = self._campaign
        name = start.host
        status = self._scheduler.status[name]
        if status is Sched.DONE:
            campaign._set(name, Status.ONLINE, state=FINAL)
        elif status is Sched.FAILED:
            self._runner.done_with(name)
            campaign._set(name, Status.FAILED, error=self._scheduler.dead.get(name), stage=start.stage.value)
        elif status is Sched.BLOCKED:
            self._runner.done_with(name)
            campaign._set(name, Status.BLOCKED, reason=self._scheduler.dead.get(name))
        elif outcome.result is Result.FAILED:
            campaign._set(
                name, Status.WAITING, reason=f"{start.stage.value} failed, retrying: {outcome.error}"
            )
        else:
            campaign._set(name, Status.WAITING, reason=outcome.error or self._scheduler.why(name))


class _Heartbeat:
    """Renews the run's heartbeat, leases and pool claims while its process lives."""

    def __init__(self, ledger: Ledger, run_id: str, seconds: float, every: float) -> None:
        self._ledger = ledger
        self._run_id = run_id
        self._seconds = seconds
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def start(self) -> None:
        self._ledger.heartbeat(self._run_id, self._seconds)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(min(self._every, self._seconds / 3)):
            try:
                self._ledger.heartbeat(self._run_id, self._seconds)
            except Exception:  # a database hiccup: the next beat tries again, well within the lease
                log.warning("run %s: could not renew its heartbeat", self._run_id, exc_info=True)


class LedgerWorld:
    """What the ledger says about everything outside this run's own stages."""

    def __init__(
        self,
        campaign: Campaign,
        scheduler: Scheduler,
        jobs: Mapping[str, Job],
        wave_index: Mapping[str, int],
        to_approve: Sequence[WaveToApprove],
    ) -> None:
        self._campaign = campaign
        self._ledger = campaign.ledger
        self._scheduler = scheduler
        self._jobs = jobs
        self._wave_index = wave_index
        self._to_approve = {w.wave: w for w in to_approve}
        self._settings = campaign.settings
        self.poll_minutes = campaign.settings.poll_seconds / 60.0
        self._claims: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self._waiting: dict[str, str] = {}
        """Hosts with a waiting pool claim filed (their stage), so other runs keep their place."""
        self._waiting_since: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        self._last_reasons = 0.0
        self._steps_asked: dict[str, str] = {}
        """Steps whose named approval was asked for (scope -> what the approver was shown)."""

    def refresh(self, scheduler: Scheduler, now: float) -> None:
        self._approvals(scheduler)
        self._ask_for_steps(scheduler)
        outside = scheduler.waits_for_outside()
        if outside:
            self._outside(scheduler, sorted(outside), now)
        taken = self._ledger.slots.taken_by_others(self._campaign.run_id)
        for pool in set(taken) | {p for p, (_, others) in _uses(scheduler).items() if others}:
            scheduler.set_foreign(pool, taken.get(pool, 0))
        for name, stage in list(self._waiting.items()):
            if scheduler.status[name] is not Sched.READY:
                self._waiting.pop(name)
                if scheduler.status[name] is not Sched.RUNNING:
                    self._ledger.slots.withdraw(self._campaign.run_id, name, stage)
        # What waits for slots keeps its place against other runs: file its claims.
        queued = [s for s in scheduler.waiting_for_slots(per_pool=8) if s.host not in self._waiting]
        if queued:
            self._ledger.slots.wait(
                self._campaign.run_id,
                [Request(s.host, s.stage.value, s.pools, s.priority) for s in queued],
                self._settings.lease_seconds,
            )
            self._waiting.update({s.host: s.stage.value for s in queued})
        self._reasons(scheduler, now)
        self._campaign.on_poll(self._campaign)

    def _ask_for_steps(self, scheduler: Scheduler) -> None:
        """A step that needs a named approval is asked for when it is due, not before."""
        due = [n for n in scheduler.steps_awaiting_approval() if approval_scope(n) not in self._steps_asked]
        if not due:
            return
        asks = [WaveToApprove(approval_scope(n), (), step_summary(self._campaign.plan, n)) for n in due]
        # A rehearsal approves by itself: say it in the log only; a person is told.
        level = logging.INFO if getattr(self._campaign.approver, "automatic", False) else logging.WARNING
        for ask in asks:
            self._steps_asked[ask.wave] = ask.summary
            log.log(level, "step %s is due and needs a named approval", ask.wave.removeprefix(STEP_SCOPE))
        self._campaign.approver.ask(asks)

    def _outside_steps(self, scheduler: Scheduler, outside: list[str]) -> list[str]:
        """Steps and milestones (a stage of a host) outside this run: done, stuck, or nobody on them.
        Returns the plain hosts, for the rest of the look."""
        plan = self._campaign.plan
        steps = [n for n in outside if n in plan.steps]
        milestones = [n for n in outside if split_milestone(n) is not None]
        if steps:
            records = self._ledger.steps.states()
            for name in steps:
                record = records.get(name)
                state = record.state if record is not None else StepState.PENDING
                if state is StepState.DONE:
                    scheduler.outside_online(name)
                elif state in STEP_STUCK and not plan.estate.procedures[name].repeatable:
                    scheduler.outside_stuck(name, f"is {state.value}: an operator re-arms it")
                else:
                    note = f"step {name} is {state.value}" + (
                        "" if state is StepState.RUNNING else f": start a run of wave {plan.steps[name].wave}"
                    )
                    if scheduler.notes.get(name) != note:
                        scheduler.notes[name] = note
                        log.warning("waiting for %s", note)
        if milestones:
            parsed = {n: split_milestone(n) for n in milestones}
            states = self._ledger.states([p[0] for p in parsed.values() if p is not None])
            for name, found in parsed.items():
                assert found is not None
                host, stage = found
                host_state = states.get(host, HostState.COMPROMISED)
                if milestone_reached(plan.estate.hosts[host], host_state, stage):
                    scheduler.outside_online(name)
                elif host_state in STUCK:
                    scheduler.outside_stuck(name, f"{host} is {host_state.value}")
                else:
                    note = (
                        f"{host} is {host_state.value}, its {stage.value} not done: start a run of its wave"
                    )
                    if scheduler.notes.get(name) != note:
                        scheduler.notes[name] = note
        return [n for n in outside if n not in plan.steps and split_milestone(n) is None]

    def _outside(self, scheduler: Scheduler, outside: list[str], now: float) -> None:
        """Hosts of no stage of this run that some of its hosts wait for: online, stuck, or who works
        on them (a run alive, a run that is gone, nobody), said at once rather than after a timeout."""
        outside = self._outside_steps(scheduler, outside)
        states = self._ledger.states(outside)
        leases = self._ledger.leases()
        runs: dict[str, RunRecord] = {}
        for name in outside:
            state = states.get(name)
            if state is FINAL:
                scheduler.outside_online(name)
                continue
            if state is not None and state in STUCK:
                scheduler.outside_stuck(name, f"is {state.value}")
                continue
            lease = leases.get(name)
            holder = None
            if lease is not None:
                if lease[0] not in runs:
                    runs[lease[0]] = self._ledger.run(lease[0])
                holder = runs[lease[0]]
            wave = self._campaign.plan.hosts[name].wave if name in self._campaign.plan.hosts else "?"
            shown = state.value if state is not None else "not in the ledger"
            if holder is not None and holder.alive and holder.id != self._campaign.run_id:
                note = f"run {holder.id} is restoring it ({shown})"
            elif holder is not None and holder.id != self._campaign.run_id:
                note = (
                    f"it is {shown} under run {holder.id}, which is gone: a run of wave {wave} "
                    "takes it over at once"
                )
            else:
                note = f"it is {shown} and no run is working on it: start a run of wave {wave}"
            if scheduler.notes.get(name) != note:
                scheduler.notes[name] = note
                log.warning("waiting for %s: %s", name, note)
            since = self._waiting_since.setdefault(name, now)
            if (now - since) * 60.0 > self._settings.dependency_timeout:
                scheduler.outside_stuck(name, f"not online after {self._settings.dependency_timeout:.0f} s")

    def _approvals(self, scheduler: Scheduler) -> None:
        approved, refused = self._campaign.approver.poll()
        automatic = getattr(self._campaign.approver, "automatic", False)
        for scope in [s for s in approved if s in self._steps_asked]:
            shown = self._steps_asked.pop(scope)
            step = scope.removeprefix(STEP_SCOPE)
            self._ledger.record_approval(
                self._campaign.run_id, scope, (), approved.pop(scope), shown, automatic=automatic
            )
            scheduler.approve_step(step)
        for scope in [s for s in refused if s in self._steps_asked]:
            self._steps_asked.pop(scope)
            why = refused.pop(scope)
            self.refused[scope] = why
            scheduler.give_up(scope.removeprefix(STEP_SCOPE), Sched.BLOCKED, f"not approved: {why}")
        for wave, approver in approved.items():
            request = self._to_approve.pop(wave, None)
            if request is None:
                continue
            self._ledger.record_approval(
                self._campaign.run_id,
                wave,
                request.hosts,
                approver,
                request.summary,
                automatic=automatic,
            )
            scheduler.approve(self._wave_index[wave])
        for wave, why in refused.items():
            if self._to_approve.pop(wave, None) is None:
                continue
            self.refused[wave] = why
            for name in self._jobs:
                if self._campaign.plan.wave_of(name) == wave:
                    scheduler.give_up(name, Sched.BLOCKED, f"wave {wave} not approved: {why}")

    def _reasons(self, scheduler: Scheduler, now: float) -> None:
        """Why each waiting host waits, for the managers' view (not on every poll: it reads them all)."""
        if (now - self._last_reasons) * 60.0 < 5.0:
            return
        self._last_reasons = now
        seen: dict[str, HostProgress | StepProgress] = {
            **self._campaign.snapshot(),
            **self._campaign.step_snapshot(),
        }
        for name, item in seen.items():
            if name not in scheduler.status:
                continue
            status = scheduler.status[name]
            if status in (Sched.PENDING, Sched.READY):
                reason = scheduler.why(name)
                if item.status is not Status.WAITING or item.reason != reason:
                    self._campaign._set(name, Status.WAITING, reason=reason)
            elif status is Sched.BLOCKED and item.status is not Status.BLOCKED:
                self._campaign._set(name, Status.BLOCKED, reason=scheduler.dead.get(name))
            elif status is Sched.FAILED and item.status is not Status.FAILED:
                self._campaign._set(name, Status.FAILED, error=scheduler.dead.get(name))

    def grant(self, starts: Sequence[Start], scheduler: Scheduler) -> list[Start]:
        pooled = [s for s in starts if s.pools]
        chosen = [s for s in starts if not s.pools]
        if pooled:
            answer = self._ledger.slots.grant(
                self._campaign.run_id,
                [Request(s.host, s.stage.value, s.pools, s.priority) for s in pooled],
                self._settings.lease_seconds,
            )
            granted = {(r.host, r.stage) for r in answer.granted}
            for start in pooled:
                key = (start.host, start.stage.value)
                if key in granted:
                    with self._lock:
                        self._claims[start.host] = answer.claims[key]
                    self._waiting.pop(start.host, None)
                    chosen.append(start)
                else:
                    self._waiting[start.host] = start.stage.value
            if len(chosen) < len(starts):
                for pool, taken in answer.taken_by_others.items():
                    scheduler.set_foreign(pool, taken)
        return chosen

    def take_claims(self, host: str) -> tuple[int, ...]:
        """The claims granted for a host's stage, handed to the stage that runs (it releases them)."""
        with self._lock:
            return self._claims.pop(host, ())

    def release(self, start: Start) -> None:
        """Claims still here belong to a stage that never ran (its task did not start)."""
        claims = self.take_claims(start.host)
        if claims:
            self._ledger.slots.release(claims)

    def may_change(self, scheduler: Scheduler, now: float) -> bool:
        if self._to_approve and scheduler.waiting_for_approval() and self._campaign.approver.pending():
            return True
        if scheduler.steps_awaiting_approval():
            return True  # asked for when due, answered by a person: this run waits for the answer
        return scheduler.waits_for_others() or bool(scheduler.waits_for_outside())


def run_campaign(
    ledger: Ledger,
    the_plan: Plan,
    fleet: Fleet,
    selection: Selection,
    *,
    mode: str,
    actor: str,
    approver: Approver,
    settings: CampaignSettings | None = None,
    executor: Executor | None = None,
    on_change: Callable[[HostProgress], None] = lambda progress: None,
) -> tuple[str, RunSummary]:
    """A whole run on threads: the ledger run opened, the campaign run, its outcome recorded."""
    scope = ", ".join(selection.waves) or "every wave"
    run_id = ledger.start_run(mode, scope, actor)
    campaign = Campaign(
        ledger,
        the_plan,
        fleet,
        selection,
        run_id=run_id,
        actor=actor,
        executor=executor or ThreadExecutor(),
        approver=approver,
        settings=settings,
        on_change=on_change,
    )
    summary = campaign.run()
    ledger.finish_run(run_id, "completed" if summary.ok else "failed")
    return run_id, summary
