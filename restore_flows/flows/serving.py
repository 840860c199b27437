"""Deployments of the flows, served from one long-running process (``restore up``).

``serve()`` needs no work pool: the lightest way to make the flows runnable from the UI. Scaling out
(a worker per site) means work pools, with the same flows.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from restore_flows.flows.restore import restore_estate, restore_status, restore_wave
from restore_flows.inventory.loader import load_estate
from restore_flows.planning import plan
from restore_flows.settings import Settings

WAVE_DEPLOYMENT = "restore-wave/restore-wave"
ESTATE_DEPLOYMENT = "restore-estate/restore-estate"


def deployments(settings: Settings) -> list[RunnerDeployment]:
    """The deployments, with the inventory's waves as the wave dropdown of the Run form."""
    waves = [w.name for w in plan(load_estate(settings.inventory, settings.max_hosts)).waves]
    wave = cast(
        RunnerDeployment,
        restore_wave.to_deployment(
            name="restore-wave",
            description="Restore one wave: approval before the first wipe, progress and ETA as artifacts.",
            tags=["restore"],
        ),
    )
    schema: Any = wave._parameter_openapi_schema
    definitions = schema.definitions or {}
    model = definitions.get("WaveParameters", {})
    if "wave" in model.get("properties", {}):
        model["properties"]["wave"]["enum"] = waves  # the server validates the choice too
    estate = cast(
        RunnerDeployment,
        restore_estate.to_deployment(
            name="restore-estate",
            description=(
                "The campaign: every wave scheduled at once, intensive care first, each wave with its "
                "own approval; progress and forecast as artifacts."
            ),
            tags=["restore"],
        ),
    )
    schema = estate._parameter_openapi_schema
    model = (schema.definitions or {}).get("EstateParameters", {})
    if "waves" in model.get("properties", {}):
        model["properties"]["waves"]["items"] = {"type": "string", "enum": waves}
    status = cast(
        RunnerDeployment,
        restore_status.to_deployment(
            name="restore-status",
            description="Progress and ETA of the estate from the ledger, as artifacts.",
            tags=["restore"],
        ),
    )
    return [wave, estate, status]


def main() -> None:
    settings = Settings()
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    serve(*deployments(settings), limit=limit, query_seconds=1, print_starting_message=True)


if __name__ == "__main__":
    main()
