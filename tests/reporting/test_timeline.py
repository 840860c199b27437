"""The timeline SVG: one row per wave with the plan, what was done and the forecast."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

from restore_flows.reporting.overview import overview, planned
from restore_flows.reporting.timeline import SVG_NAMESPACE, gantt_svg
from tests.reporting.scenarios import Scenario

NS = {"svg": SVG_NAMESPACE}


def _rows(svg: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)
    rows = {}
    for group in root.findall("svg:g[@class='wave']", NS):
        name = group.find("svg:text", NS)
        assert name is not None
        rows[str(name.text)] = group
    return rows


def _classes(row: ET.Element) -> list[str]:
    return [str(e.get("class")) for e in row if e.get("class")]


def test_a_row_per_wave_with_done_forecast_and_plan(trouble: Scenario) -> None:
    view = overview(trouble.ledger, trouble.plan, plan_forecast=planned(trouble.plan))
    svg = gantt_svg(view, tz=dt.UTC)
    rows = _rows(svg)  # also: it is well-formed XML in the SVG namespace
    assert list(rows) == ["core", "icu", "rest"]
    assert _classes(rows["core"]) == ["plan", "done", "online-curve"]
    assert "forecast stuck" in _classes(rows["icu"])  # some of its hosts need an operator
    texts = [t.text for t in rows["icu"].iter(f"{{{SVG_NAMESPACE}}}text")]
    assert "4 stuck" in texts
    assert any(
        str(t).startswith("back ") for t in (x.text for x in rows["core"].iter(f"{{{SVG_NAMESPACE}}}text"))
    )


def test_before_anything_started_only_the_forecast_is_drawn(fresh: Scenario) -> None:
    view = overview(fresh.ledger, fresh.plan)
    rows = _rows(gantt_svg(view, tz=dt.UTC))
    for row in rows.values():
        assert "done" not in _classes(row)
        assert "online-curve" not in _classes(row)


def test_inline_svg_has_no_namespace_for_html(trouble: Scenario) -> None:
    view = overview(trouble.ledger, trouble.plan)
    assert "xmlns" not in gantt_svg(view, inline=True)
    assert f'xmlns="{SVG_NAMESPACE}"' in gantt_svg(view)
