"""The local server a crashed CLI leaves behind, for real: one still booting is waited for and adopted,
one that is alive but does not answer is replaced, and the last user stops what it used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from restore_flows.flows.server import is_healthy, shared_server, wait_healthy
from restore_flows.ledger.liveness import process_alive as _alive
from tests.chaos import free_port

pytestmark = pytest.mark.timeout(240)


def _record(home: Path) -> dict[str, object]:
    value = json.loads((home / "server.json").read_text())
    assert isinstance(value, dict)
    return value


def _killed_while_starting(home: Path, port: int) -> None:
    """A CLI that starts the server, then is killed before it answers (kill -9: no clean-up)."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from restore_flows.flows.server import shared_server
        with shared_server(Path({str(home)!r}), port={port}):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    ended = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert ended.returncode == -signal.SIGKILL


def test_a_server_left_booting_by_a_killed_cli_is_waited_for_and_adopted(tmp_path: Path) -> None:
    home, port = tmp_path / "prefect", free_port()
    _killed_while_starting(home, port)
    booting = _record(home)
    assert booting["state"] == "starting"
    pid = int(str(booting["pid"]))
    assert _alive(pid)

    with shared_server(home, port=port) as server:
        assert server.said.endswith("is starting")
        said = server.ready()
        assert said.endswith("is ready"), said
        assert is_healthy(server.api_url)
        after = _record(home)
        assert (after["pid"], after["state"]) == (pid, "up")  # the same server, not a second one
    # This process was its last user: it stopped it.
    assert not is_healthy(f"http://127.0.0.1:{port}/api")
    assert not _alive(pid)
    assert not (home / "server.json").exists()


@pytest.mark.parametrize(
    ("state", "since"),
    [("up", None), ("stopping", None), ("starting", 0.0)],
    ids=["hung", "half-stopped", "booting-for-ever"],
)
def test_a_server_alive_but_not_answering_is_replaced(
    tmp_path: Path, state: str, since: float | None
) -> None:
    """Hung, half-stopped by a CLI killed as it stopped it, or "starting" for longer than any boot:
    waiting for it would never end."""
    home, port = tmp_path / "prefect", free_port()
    _killed_while_starting(home, port)
    old = int(str(_record(home)["pid"]))
    wait_healthy(f"http://127.0.0.1:{port}/api", 120)
    os.killpg(old, signal.SIGSTOP)  # alive, holds its port, answers nothing
    marked = {**_record(home), "state": state}
    if since is not None:
        marked["since"] = since
    (home / "server.json").write_text(json.dumps(marked))

    with shared_server(home, port=port) as server:
        said = server.ready()
        new = _record(home)
        assert said.startswith(f"replaced the Prefect server pid {old}"), said
        assert int(str(new["pid"])) != old
        assert new["state"] == "up"
        assert not _alive(old)
        assert is_healthy(server.api_url)
    assert not is_healthy(f"http://127.0.0.1:{port}/api")
