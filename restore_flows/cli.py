"""The ``restore`` command. Thin: parse arguments, call the package, print, choose the exit status.

Exit status: 0 success (warnings allowed), 2 the input cannot be used (inventory errors, bad arguments).
Expected failures never show a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from restore_flows import render
from restore_flows.errors import RestoreError, UsageError
from restore_flows.inventory.loader import LoadResult, load_inventory
from restore_flows.inventory.schema import write_schema
from restore_flows.planning import plan as make_plan

app = typer.Typer(
    name="restore",
    help="Restore a ransomware-hit estate in clinical-priority waves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INVALID = 2

InventoryDir = Annotated[
    Path,
    typer.Argument(
        help="Inventory directory: every *.yaml file under it is read and merged.",
        envvar="RESTORE_INVENTORY",
        show_default=True,
    ),
]


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _load_or_exit(directory: Path) -> LoadResult:
    try:
        result = load_inventory(directory)
    except UsageError as exc:
        _err().print(f"error: {exc}", style="red")
        raise typer.Exit(EXIT_INVALID) from None
    render.diagnostics(_err(), result.diagnostics)
    if result.estate is None:
        errors = len(result.errors)
        _err().print(
            f"{errors} error{'s' if errors != 1 else ''} in {len(result.files)} file(s): "
            "the inventory cannot be used until they are fixed",
            style="bold red",
        )
        raise typer.Exit(EXIT_INVALID)
    return result


@app.command()
def validate(directory: InventoryDir = Path("inventory")) -> None:
    """Check the inventory and list every mistake with its file and line."""
    result = _load_or_exit(directory)
    assert result.estate is not None
    warnings = len(result.warnings)
    suffix = f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""
    _out().print(f"inventory OK: {render.estate_summary(result.estate)}{suffix}")


@app.command()
def plan(
    directory: InventoryDir = Path("inventory"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show the restore waves: what each contains, and which hosts were pulled forward and why."""
    result = _load_or_exit(directory)
    assert result.estate is not None
    the_plan = make_plan(result.estate)
    if as_json:
        json.dump(the_plan.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render.plan(_out(), the_plan)


@app.command()
def schema(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the JSON Schema.")] = Path(
        "schema/inventory.schema.json"
    ),
) -> None:
    """Write the JSON Schema of inventory files, for editors (yaml-language-server)."""
    write_schema(output)
    _out().print(f"wrote {output}")


def main() -> None:
    try:
        app()
    except RestoreError as exc:
        _err().print(f"error: {exc}", style="red")
        sys.exit(EXIT_INVALID)
