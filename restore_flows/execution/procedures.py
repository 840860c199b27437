"""One procedure step, through the ledger: start it (only from pending, for one run), generate its
secrets, run it on the fleet, record the outcome with the secrets' fingerprints. What to run when is
the scheduler's decision; this only does it, safely.

A step that may have run is never started again here: its command failed after it was sent, its
check did not pass, or its run died while it ran; the ledger then holds it for an operator
('restore decide rearm'), unless the inventory declares it ``repeatable``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass

from restore_flows.drivers.base import Fleet
from restore_flows.drivers.procedures import StepError, fingerprint, generate_secret, scrub
from restore_flows.errors import LedgerError
from restore_flows.inventory.procedures import ProcedureStep
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.steps import Begun
from restore_flows.states import StepEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepResult:
    step: str
    done: bool = False
    held_by: str | None = None
    """Another run, alive, is running it: try again later."""
    retryable: bool = False
    """It failed without running (its target unreachable), or it is repeatable: try again."""
    stuck: bool = False
    """An operator decides: it may have run, or the ledger refused."""
    error: str | None = None


@dataclass
class StepRunner:
    ledger: Ledger
    fleet: Fleet
    run_id: str
    actor: str
    steps: Mapping[str, ProcedureStep]

    def run(self, name: str) -> StepResult:
        """Never raises: every problem is a result."""
        step = self.steps[name]
        try:
            return self._run(step)
        except LedgerError as exc:
            return StepResult(name, stuck=True, error=f"step {name}: {exc}")
        except Exception as exc:  # a bug: say what, and leave the step to an operator
            log.error("step %s: unexpected error\n%s", name, traceback.format_exc())
            return StepResult(name, stuck=True, error=f"step {name}: unexpected {type(exc).__name__}")

    def _run(self, step: ProcedureStep) -> StepResult:
        steps = self.ledger.steps
        begin = steps.begin(
            step.name, self.run_id, self.actor, repeatable=step.repeatable, needs_approval=step.approval
        )
        if begin.outcome is Begun.DONE:
            return StepResult(step.name, done=True)
        if begin.outcome is Begun.HELD:
            return StepResult(step.name, held_by=begin.held_by, error=f"run {begin.held_by} is running it")
        if begin.outcome is Begun.STUCK:
            return StepResult(step.name, stuck=True, error=begin.why)
        # Generated here, held only in this frame: handed to the command, fingerprinted, dropped.
        secrets = {name: generate_secret() for name in step.generates}
        try:
            try:
                output = self.fleet.run_step(step, secrets)
            except StepError as exc:
                event = StepEvent.FAIL if exc.started else StepEvent.NOT_STARTED
                detail = scrub(exc.detail, secrets.values())
                steps.finish(step.name, self.run_id, self.actor, event, detail=detail)
                again = not exc.started or step.repeatable
                return StepResult(
                    step.name, retryable=again, stuck=not again, error=f"step {step.name}: {detail}"
                )
            except Exception as exc:
                # Whatever it was, the command may have been sent: treat it as run.
                log.error("step %s: unexpected error\n%s", step.name, traceback.format_exc())
                detail = f"unexpected {type(exc).__name__} while it ran"
                steps.finish(step.name, self.run_id, self.actor, StepEvent.FAIL, detail=detail)
                return StepResult(step.name, stuck=True, error=f"step {step.name}: {detail}")
            rotations = [(name, fingerprint(value)) for name, value in secrets.items()]
            steps.finish(
                step.name,
                self.run_id,
                self.actor,
                StepEvent.SUCCEED,
                output_sha256=output.output_sha256,
                detail=scrub(output.summary, secrets.values()),
                rotations=rotations,
            )
        finally:
            secrets.clear()
        return StepResult(step.name, done=True)
