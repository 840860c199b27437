"""Serving the restore deployments from a process of a test's own, and driving runs through the API as
the UI does. Shared by the flow tests and the live tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.client.schemas.objects import FlowRun, State
from prefect.settings import PREFECT_API_URL, temporary_settings

from restore_flows.flows.server import PrefectServer, stop_process_group
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.repository import Ledger

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    """A serve process for one test, with its inventory and rehearsal ledger."""

    server: PrefectServer
    env: dict[str, str]
    ledger_url: str
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "restore_flows.flows.serving", "10"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, signal.SIGTERM, 20)

    def ledger(self) -> Ledger:
        return Ledger(make_engine(self.ledger_url))


def serve_inventory(server: PrefectServer, tmp_path: Path, **files: str) -> Served:
    """Start serving the deployments with the inventory ``files`` (name -> YAML) and a rehearsal
    ledger of their own under ``tmp_path``; the caller stops it."""
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    for name, text in files.items():
        (inventory / f"{name}.yaml").write_text(textwrap.dedent(text))
    ledger_url = f"sqlite:///{tmp_path / 'rehearsal.sqlite3'}"
    env = server.client_env()
    env.update(
        RESTORE_INVENTORY=str(inventory),
        RESTORE_DATA_DIR=str(tmp_path / "data"),
        RESTORE_REHEARSAL_DATABASE_URL=ledger_url,
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONWARNINGS", None)
    serving = Served(server, env, ledger_url, tmp_path / "serve.log")
    serving.start()
    return serving


def api_client(server: PrefectServer) -> SyncPrefectClient:
    """A client of ``server``. Prefect reads its settings once, when first imported: a test process
    that imported it before this server existed would otherwise get a throw-away ephemeral server."""
    settings = server.client_env({})
    os.environ.update(settings)
    with temporary_settings(updates={PREFECT_API_URL: settings["PREFECT_API_URL"]}):
        return get_client(sync_client=True)


def start_run(served: Served, deployment: str, **params: Any) -> UUID:
    with api_client(served.server) as client:
        found = eventually(lambda: client.read_deployment_by_name(deployment), timeout=90)
        run = client.create_flow_run_from_deployment(found.id, parameters={"params": params})
        return run.id


def eventually(probe: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll until ``probe`` returns a truthy value without raising; bounded."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout} s (last error: {last!r})")


def final_state(served: Served, run_id: UUID, timeout: float = 180) -> State[Any]:
    with api_client(served.server) as client:
        run: FlowRun = eventually(
            lambda: (r := client.read_flow_run(run_id)).state and r.state.is_final() and r, timeout
        )
        assert run.state is not None
        return run.state


def latest_artifact(served: Served, key: str) -> Any:
    with api_client(served.server) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))
        )
        return found[0].data if found else None


def answer_form(
    client: SyncPrefectClient, run_id: UUID, run_input: dict[str, Any], timeout: float = 60
) -> Any:
    """Answer a paused run's form as the UI's Resume dialog does. The run shows Paused a moment before
    its form's schema is saved; an answer in between is refused for that reason only: ask again."""
    deadline = time.monotonic() + timeout
    while True:
        result = client.resume_flow_run(run_id, run_input=run_input)
        reason = getattr(result.details, "reason", "") or ""
        if result.status.value != "REJECT" or "schema not found" not in reason or time.monotonic() > deadline:
            return result
        time.sleep(0.2)
