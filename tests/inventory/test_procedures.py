"""Procedure steps in the inventory: what the file may say, and every mistake with its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restore_flows.cli import app
from restore_flows.inventory.loader import load_estate, load_inventory
from restore_flows.inventory.models import Stage
from restore_flows.inventory.procedures import Need, ShellAction
from restore_flows.planning import plan
from tests.conftest import WriteInventory
from tests.inventory.procedure_estate import ESTATE, STEPS


def _errors(directory: Path) -> list[str]:
    found = load_inventory(directory).errors
    return [
        f"{Path(d.file).name}:{d.line}: {d.field}: {d.message}".replace(f"{directory}/", "") for d in found
    ]


def test_steps_resolve_with_their_needs_waits_and_gates(write_inventory: WriteInventory) -> None:
    estate = load_estate(write_inventory(estate=ESTATE, steps=STEPS))
    first, second, vault = (estate.procedures[n] for n in ("reset-1", "reset-2", "vault"))
    assert first.needs == (Need("dc-01", Stage.VERIFY),)  # named with a stage: not needed online
    assert first.action == ShellAction(("dc-01",), "Reset-Krbtgt -Server {host}", 600)
    assert first.gated_hosts() == {
        "dc-01": Stage.RELEASE,
        "ws-icu-1": Stage.RELEASE,
        "ws-icu-2": Stage.RELEASE,
        "ws-icu-3": Stage.RELEASE,
    }
    assert second.waits[0].minutes == 600
    assert second.waits[0].reason == "ticket lifetime"
    assert Need("reset-1") in second.needs  # a wait after a step needs it done
    assert second.gated_hosts() == {"fs-01": Stage.RELEASE}
    assert vault.target_hosts == ()
    assert vault.minutes == 30


def test_the_plan_places_steps_with_the_first_wave_that_waits_for_them(
    write_inventory: WriteInventory,
) -> None:
    the_plan = plan(load_estate(write_inventory(estate=ESTATE, steps=STEPS)))
    # reset-1 gates the release of the DC it runs on (core); reset-2 only a server of the last wave.
    assert the_plan.steps["reset-1"].wave == "core"
    assert the_plan.steps["reset-2"].wave == "rest"
    found = {p["name"]: p for p in the_plan.to_json()["procedures"]}
    assert found["reset-2"]["not_before"] == [
        {"step": "reset-1", "after_minutes": 600.0, "reason": "ticket lifetime"}
    ]
    assert found["reset-1"]["needs"] == [{"host": "dc-01", "stage": "verify"}]
    assert [g["selector"] for g in found["reset-1"]["gates"]] == ["hosts dc-01", "kind workstation"]


def test_a_wave_gate_takes_the_hosts_the_plan_puts_in_that_wave(write_inventory: WriteInventory) -> None:
    steps = (
        STEPS
        + """
  - name: service-accounts
    runs_on: {host: dc-01}
    needs: [{host: dc-01, stage: verify}]
    command: "Reset-ServiceAccounts"
    gates: [{wave: icu}]
"""
    )
    the_plan = plan(load_estate(write_inventory(estate=ESTATE, steps=steps)))
    gated = the_plan.estate.procedures["service-accounts"].gated_hosts()
    assert set(gated) == set(the_plan.wave("icu").hosts)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            "  - {name: a, needs: [nosuch], http: {url: 'https://v.example/'}}",
            "steps.yaml:2: procedures[0].needs[0]: unknown step or host 'nosuch'",
        ),
        (
            "  - {name: a, not_before: {step: nosuch, after: 1h, reason: r}, http: {url: 'https://v.example/'}}",
            "steps.yaml:2: procedures[0].not_before.step: unknown step 'nosuch'",
        ),
        (
            "  - {name: a, gates: [{wave: nosuch}], http: {url: 'https://v.example/'}}",
            "steps.yaml:2: procedures[0].gates[0].wave: unknown wave 'nosuch'",
        ),
        (
            "  - {name: dc-02, http: {url: 'https://v.example/'}}",
            "steps.yaml:2: procedures[0].name: step 'dc-02' has the name of a host (estate.yaml:27): "
            "name it apart",
        ),
        (
            "  - {name: a, runs_on: {host: fs-01}, command: x, needs: [{host: fs-01, stage: reimage}]}",
            "steps.yaml:2: procedures[0].needs[0].stage: fs-01 has no reimage stage "
            "(it is restored by backup)",
        ),
        (
            "  - {name: a, runs_on: {host: fs-01}, command: 'reset {secret}'}",
            "steps.yaml:2: procedures[0].command: unknown placeholder {secret}: a step's command may use "
            "{host}, {address}, {step}",
        ),
        (
            "  - {name: a, runs_on: {role: nosuch}, command: x}",
            "steps.yaml:2: procedures[0].runs_on.role: no host has role 'nosuch'",
        ),
        (
            "  - {name: a, http: {url: 'https://v.example/'}, check: {type: tcp_port, port: 443}}",
            "steps.yaml:2: procedures[0].check.type: a tcp_port check needs a host: "
            "an http step's check must be http",
        ),
        (
            "  - {name: a, not_before: {step: a, after: soon, reason: r}, http: {url: 'https://v.example/'}}",
            "steps.yaml:2: procedures[0].not_before.after: 'soon' is not a duration: write "
            "minutes, or a number with h or min (10h, 45min) (got 'soon')",
        ),
        (
            "  - {name: a}",
            "steps.yaml:2: procedures[0]: say what the step does: runs_on and command, or http",
        ),
    ],
)
def test_a_mistake_in_a_step_names_its_file_line_and_field(
    write_inventory: WriteInventory, step: str, expected: str
) -> None:
    directory = write_inventory(estate=ESTATE, steps="\nprocedures:\n" + step + "\n")
    assert expected in _errors(directory)


def test_a_cycle_between_steps_and_hosts_is_refused(write_inventory: WriteInventory) -> None:
    # b needs a; a needs dc-02 online; dc-02 waits for b before its verify.
    steps = """
procedures:
  - {name: a, needs: [dc-02], http: {url: "https://v.example/a"}}
  - {name: b, needs: [a], http: {url: "https://v.example/b"}, gates: [{hosts: [dc-02], before: verify}]}
"""
    errors = _errors(write_inventory(estate=ESTATE, steps=steps))
    assert len(errors) == 1
    assert "cycle between steps and hosts" in errors[0]
    assert "a" in errors[0]
    assert "dc-02" in errors[0]


def test_a_step_may_need_a_stage_of_the_host_it_releases(write_inventory: WriteInventory) -> None:
    # Cleaning up the restored DC before its release is the forest recovery's whole point: no cycle.
    assert _errors(write_inventory(estate=ESTATE, steps=STEPS)) == []


def test_restore_plan_lists_the_steps_with_their_gates(write_inventory: WriteInventory) -> None:
    directory = write_inventory(estate=ESTATE, steps=STEPS)
    result = CliRunner().invoke(app, ["plan", str(directory)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Procedure steps" in result.output
    assert "10 h after reset-1" in result.output
    as_json = CliRunner().invoke(app, ["plan", str(directory), "--json"])
    assert [p["name"] for p in json.loads(as_json.output)["procedures"]] == ["reset-1", "reset-2", "vault"]


def test_the_sample_estate_has_the_forest_recovery_sequence() -> None:
    the_plan = plan(load_estate(Path("inventory")))
    steps = the_plan.estate.procedures
    assert list(steps)[:5] == [
        "seize-fsmo",
        "metadata-cleanup",
        "rid-pool-invalidation",
        "dc-account-reset",
        "krbtgt-reset-1",
    ]
    assert steps["krbtgt-reset-2"].waits[0].step == "krbtgt-reset-1"
    assert steps["krbtgt-reset-2"].waits[0].minutes == 600
    workstations = {n for n, h in the_plan.estate.hosts.items() if h.kind.value == "workstation"}
    for gate in ("krbtgt-reset-1", "privileged-accounts-reset"):
        assert workstations <= set(steps[gate].gated_hosts()), gate
    # The restored DC stays in quarantine until it is cleaned up; the rebuilt ones are promoted after.
    for name in (
        "seize-fsmo",
        "metadata-cleanup",
        "rid-pool-invalidation",
        "dc-account-reset",
        "krbtgt-reset-1",
    ):
        assert steps[name].gated_hosts()["dc-dc1-01"] is Stage.RELEASE
        assert Need("dc-dc1-01", Stage.VERIFY) in steps[name].needs
