"""The project's own errors. Lower-level errors are re-raised as one of these, chained with ``from``.

    RestoreError
    ├── InventoryError        the inventory cannot be used; carries every Diagnostic found
    ├── UsageError            a command was given something it cannot work with (missing directory...)
    └── LedgerError           the ledger refused or could not record something
        ├── SchemaError       the database is not migrated to this code's revision (ledger.db)
        ├── UnknownHost       no such host in the ledger
        ├── IllegalTransition the state machine has no such move (states)
        ├── SafetyViolation   a safety rule forbids it: evidence, approval, clean host, reason
        ├── LeaseHeld         another run holds the host's lease
        └── LeaseLost         this run's lease expired or was taken over: it must stop writing

The drivers add theirs where they are defined, kept shallow:

    RestoreError
    ├── DriverError           a stage could not be done on a host; ``retryable`` (drivers.base)
    │   ├── DriverTimeout     a remote action did not finish in time
    │   └── RedfishError      a BMC's answer, by status: access, not found, conflict, server (drivers.redfish)
    ├── SecretNotFound        no secret source knows the name (drivers.secrets)
    └── TemplateError         a command template or value that cannot be made safe (drivers.commands)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding about the inventory, pointing at the file and line an engineer must edit."""

    file: str
    line: int
    field: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: "
        prefix = "warning: " if self.severity is Severity.WARNING else ""
        field = f"{self.field}: " if self.field else ""
        return f"{where}{prefix}{field}{self.message}"

    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.file, self.line, self.field, self.message)


class RestoreError(Exception):
    """Base of every error this project raises on purpose."""


class UsageError(RestoreError):
    pass


class InventoryError(RestoreError):
    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        errors = [d for d in self.diagnostics if d.severity is Severity.ERROR]
        super().__init__(f"{len(errors)} inventory error(s)")


class LedgerError(RestoreError):
    pass


class UnknownHost(LedgerError):
    pass


class SafetyViolation(LedgerError):
    pass


class LeaseHeld(LedgerError):
    pass


class OrderWithdrawn(LeaseHeld):
    """A site's session may not work a host for an order the scheduler took back (its session was
    taken for lost and the stage sent again): the stage belongs to the order that replaced it."""


class LeaseLost(LedgerError):
    pass
