"""A live wave through `restore run`, against real peers on loopback (see :mod:`tests.live.estate`).

Every case of the live-driver issue is one host of the same wave, so the test also shows that one
host's failure leaves the rest of the wave alone.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from restore_flows.drivers.procedures import fingerprint
from restore_flows.drivers.ssh import describe_key, parse_host_key
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.records import History
from restore_flows.ledger.repository import Ledger
from restore_flows.states import HostState, StepState
from tests.live.estate import BMC_PASSWORD, DEPLOY_TOKEN, GOOD, IMAGE, SERVERS, STEP, LiveEstate, live_estate

pytestmark = pytest.mark.timeout(240)


@dataclass
class Wave:
    estate: LiveEstate
    result: subprocess.CompletedProcess[str]
    records: Ledger
    client: httpx.Client


@pytest.fixture(scope="module")
def wave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wave]:
    tmp: Path = tmp_path_factory.mktemp("live")
    with live_estate(tmp) as estate:
        command = [sys.executable, "-m", "restore_flows", "--log-level", "DEBUG"]
        env = {**os.environ, **estate.environment}
        upgraded = subprocess.run(
            [*command, "db", "upgrade"], env=env, capture_output=True, text=True, check=False
        )
        assert upgraded.returncode == 0, upgraded.stderr
        run = [
            *command,
            "run",
            "icu",
            str(estate.inventory),
            "--approver",
            "Dr. Ada Osei",
            "--confirm",
            "icu",
        ]
        try:
            result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=200, check=False)
        except subprocess.TimeoutExpired as exc:
            (tmp / "run-stderr.txt").write_bytes(exc.stderr or b"")
            pytest.fail(
                f"restore run did not finish in 200 s; the end of its log:\n{(exc.stderr or b'')[-20000:]!r}"
            )
        engine = make_engine(f"sqlite:///{estate.ledger}")
        try:
            with estate.sushy.client() as client:
                yield Wave(estate, result, Ledger(engine), client)
        finally:
            engine.dispose()


def history_job(history: History) -> str:
    """The deployment job named in the wipe's log line."""
    wiped = next(t.detail for t in history.transitions if t.event == "wipe_done")
    assert wiped is not None
    return wiped.split()[2]


def test_the_healthy_hosts_are_wiped_reimaged_verified_and_released(wave: Wave) -> None:
    assert wave.result.returncode == 1, wave.result.stderr[-3000:]  # some hosts fail, by design
    assert "7 of 15 host(s) online" in wave.result.stdout
    released = (wave.estate.management.directory / "released").read_text().split()
    assert sorted(released) == GOOD
    ledger = wave.records
    for name in GOOD:
        history = ledger.history(name)
        assert history.host.state is HostState.ONLINE
        assert [t.event for t in history.transitions].count("start_wipe") == 1
        if name in SERVERS:
            system = wave.client.get(wave.estate.sushy.system_url(name)).json()
            # The BMC really powered the host back on, after a network boot override.
            assert system["PowerState"] == "On"
            assert system["Boot"]["BootSourceOverrideTarget"] == "Pxe"
        # (ws-01 has no BMC: it was woken by a magic packet, which the deployment server heard.)
        peer = wave.estate.hosts[name]
        assert (peer.directory / "image-id").read_text().strip() == IMAGE
        # The reinstall changed the host key that the inventory pinned; the checks could only run
        # over SSH because the key reported by the deployment server was pinned in its place.
        assert peer.host_key_line != wave.estate.first_keys[name]
        reimaged = [t.detail for t in history.transitions if t.event == "reimage_done"]
        assert reimaged == [
            f"deployment job {history_job(history)} installed {IMAGE}; new host key "
            f"{describe_key(parse_host_key(peer.host_key_line))} pinned"
        ]
        assert peer.accepted_logins() >= 1


def test_each_broken_host_ends_in_its_own_state_with_a_clear_error(wave: Wave) -> None:
    expected = {
        "gw-07": (HostState.WIPE_FAILED, "401"),
        "gw-08": (HostState.WIPE_FAILED, "BMC firmware fault"),
        "gw-09": (HostState.WIPE_FAILED, "did not report power Off within 25 s"),
        "gw-10": (HostState.VERIFY_FAILED, "authentication"),
        "gw-11": (HostState.VERIFY_FAILED, "sleep 30"),
        "gw-12": (HostState.VERIFY_FAILED, "tcp_port 1"),
        "gw-13": (HostState.QUARANTINED, "Trojan:Win32/Emotet.PX!MTB"),
        "gw-14": (HostState.VERIFY_FAILED, "host key"),
    }
    ledger = wave.records
    for name, (state, words) in expected.items():
        history = ledger.history(name)
        error = str(history.attempts[-1].error)
        assert history.host.state is state, (name, error)
        assert words.lower() in error.lower(), (name, error)
        assert name in wave.result.stdout  # the run's report names every host that did not come online
    # Non-retryable errors are tried once; a BMC error that may pass is tried again (2 attempts here).
    assert [a.stage for a in ledger.history("gw-07").attempts] == ["wipe"]
    assert [a.stage for a in ledger.history("gw-08").attempts] == ["wipe", "wipe"]
    # Checks are repeated after a hang, not after our key or the host's key was refused.
    assert [a.stage for a in ledger.history("gw-11").attempts][-2:] == ["verify", "verify"]
    for name in ("gw-10", "gw-14"):
        assert [a.stage for a in ledger.history(name).attempts].count("verify") == 1, name
    # The host whose reported key is not its own was never wiped twice, and the impostor's key never
    # let the checks in.
    assert [t.event for t in ledger.history("gw-14").transitions].count("start_wipe") == 1


def test_no_secret_appears_in_any_output_log_or_the_ledger(wave: Wave) -> None:
    key_lines = [line for line in wave.estate.client_key.splitlines() if line and "-----" not in line]
    wrong_lines = [line for line in wave.estate.wrong_key.splitlines() if line and "-----" not in line]
    secrets = [BMC_PASSWORD, "not-the-password", DEPLOY_TOKEN, *key_lines, *wrong_lines]
    ledger = wave.estate.ledger.read_bytes()
    with sqlite3.connect(wave.estate.ledger) as db:
        dumped = "\n".join(db.iterdump())
    for secret in secrets:
        assert secret not in wave.result.stdout
        assert secret not in wave.result.stderr
        assert secret.encode() not in ledger
        assert secret not in dumped
    # The capture worked: the drivers' and libraries' debug logs are in it.
    assert "paramiko" in wave.result.stderr
    assert "httpx" in wave.result.stderr


def test_the_procedure_step_ran_once_over_ssh_with_its_secret_on_stdin_only(wave: Wave) -> None:
    steps = wave.records.steps
    assert steps.step(STEP).state is StepState.DONE
    history = steps.history(STEP)
    assert [e.event for e in history.log].count("start") == 1
    # The command read its generated password from standard input, one NAME=value line.
    given = (wave.estate.hosts["gw-01"].directory / "step-stdin").read_text()
    name, _, value = given.strip().partition("=")
    assert name == "KRBTGT_PASSWORD"
    assert len(value) >= 32
    [rotation] = history.rotations
    assert rotation.fingerprint == fingerprint(value)
    # Never on a command line, in a log or in the ledger: only its fingerprint.
    assert value not in wave.result.stdout
    assert value not in wave.result.stderr
    assert value.encode() not in wave.estate.ledger.read_bytes()
    assert f"step {STEP}: online" in wave.result.stdout
    # gw-02 was released only once the reset was done.
    done = next(e.at for e in history.log if e.event == "succeed")
    released = wave.records.history("gw-02").transitions[-1]
    assert released.to_state is HostState.ONLINE
    assert released.at >= done
