"""The sample estate shipped in inventory/: it must validate cleanly and plan into the promised waves."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restore_flows.cli import app
from restore_flows.inventory.loader import load_inventory
from restore_flows.inventory.models import HostKind, SiteKind
from restore_flows.inventory.schema import render_schema
from restore_flows.planning import Plan, plan

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = ROOT / "inventory"


@pytest.fixture(scope="module")
def sample_plan() -> Plan:
    result = load_inventory(INVENTORY)
    assert result.diagnostics == []  # no errors and no warnings
    assert result.estate is not None
    return plan(result.estate)


def test_counts_and_sites(sample_plan: Plan) -> None:
    estate = sample_plan.estate
    kinds = Counter(h.kind for h in estate.hosts.values())
    assert kinds == {HostKind.SERVER: 200, HostKind.WORKSTATION: 1500}
    sites = Counter(s.kind for s in estate.sites.values())
    assert sites[SiteKind.HOSPITAL] == 6
    assert sites[SiteKind.POLYCLINIC] == 1
    assert sites[SiteKind.REST_HOME] == 4
    assert sites[SiteKind.PSYCHIATRIC] == 1
    assert sites[SiteKind.CRECHE] == 3
    assert sites[SiteKind.DATACENTER] >= 1


def test_waves_in_clinical_order_and_not_empty(sample_plan: Plan) -> None:
    names = [w.name for w in sample_plan.waves]
    assert names[:4] == ["core", "icu", "lab", "radiology"]
    assert sample_plan.waves[-1].services == ("*",)
    assert len(names) >= 6
    assert all(w.hosts for w in sample_plan.waves)


def test_dependencies_start_first_everywhere(sample_plan: Plan) -> None:
    position = {
        name: (index, offset)
        for index, wave in enumerate(sample_plan.waves)
        for offset, name in enumerate(wave.hosts)
    }
    for name, host in sample_plan.estate.hosts.items():
        for dependency in host.depends_on:
            assert position[dependency] < position[name], (dependency, name)


def test_icu_pulls_its_infrastructure_forward(sample_plan: Plan) -> None:
    pulled = [p for p in sample_plan.hosts.values() if p.wave == "icu" and p.pulled_forward_by]
    assert pulled, "ICU hosts depend on EHR and EDR servers from later waves"
    for planned in pulled:
        assert sample_plan.hosts[planned.pulled_forward_chain[-1]].own_wave == "icu"


def test_plan_json_command(sample_plan: Plan) -> None:
    result = CliRunner().invoke(app, ["plan", str(INVENTORY), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [w["name"] for w in data["waves"]] == [w.name for w in sample_plan.waves]
    assert len(data["hosts"]) == 1700
    first_icu = sample_plan.wave("icu").hosts[-1]
    assert data["hosts"][first_icu]["wave"] == "icu"


def test_every_sample_file_points_editors_at_the_schema() -> None:
    for path in sorted(INVENTORY.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../schema/inventory.schema.json", path


def test_committed_schema_is_current() -> None:
    committed = (ROOT / "schema" / "inventory.schema.json").read_text()
    assert committed == render_schema(), "run 'restore schema' and commit the result"


def test_schema_command_writes_the_schema(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["schema", "--output", str(target)])
    assert result.exit_code == 0
    assert json.loads(target.read_text())["title"] == "restore-orchestrator inventory file"
