"""The sample estate (inventory and its JSON Schema), shipped with the package for ``restore init``.

In a checkout they are the top-level ``inventory/`` and ``schema/``; the wheel carries copies here, so
an installed ``restore`` on a machine without the source can still start from a working estate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from restore_flows.errors import UsageError

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parents[1]


def _source(name: str) -> Path:
    for candidate in (_PACKAGE / name, _CHECKOUT / name):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    raise UsageError(f"the sample {name}/ is missing from this installation")


def write_sample(target: Path) -> list[Path]:
    """Copy the sample ``inventory/`` and ``schema/`` into *target*; refuse to overwrite anything, so
    that running it in a directory with an engineer's inventory never loses a line of it."""
    written: list[Path] = []
    for name in ("inventory", "schema"):
        destination = target / name
        if destination.exists():
            raise UsageError(f"{destination} exists already: 'restore init' never overwrites an inventory")
    for name in ("inventory", "schema"):
        destination = target / name
        shutil.copytree(_source(name), destination)
        written.append(destination)
    return written
