"""The timeline of the restore as an SVG gantt: one row per wave, plan against what was done.

Each row, on one time axis from the first stage (or now, before anything started):

* a thin outlined bar: the plan (the forecast from nothing restored, counted from the first stage);
* a solid bar: the wave from its first stage until it was all back (green), or until now;
* a striped bar: the forecast from now until its last host is online; red and open-ended when some of
  its hosts will not come back without an operator;
* a line inside the row: the share of its hosts online over time (bottom 0 %, top 100 %);
* a red vertical line: now.

One drawing for both readers: the dashboard serves it as ``/timeline.svg``, the report puts it inline
(WeasyPrint draws SVG itself), so there is no second implementation in JavaScript.

    gantt_svg(view)                 # a complete SVG document (with its XML namespace)
    gantt_svg(view, inline=True)    # the same, to embed in an HTML page
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from restore_flows.reporting.markup import Markup, join, tag
from restore_flows.reporting.overview import Overview, WaveView

# Tick spacings a person reads easily, in minutes.
_TICKS = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880)
Scale = Callable[[dt.datetime], float]
SVG_NAMESPACE = "http://www.w3.org/2000/svg"

DONE = "#2e7d32"
RUNNING = "#1565c0"
FORECAST = "#64b5f6"
STUCK = "#c62828"
PLAN = "#555555"


@dataclass(frozen=True, slots=True)
class Layout:
    width: int = 760
    label: int = 92
    """Room on the left for the wave's name and percentage."""
    right: int = 110
    """Room on the right for the finish time."""
    row: int = 34
    top: int = 26
    """Room above the rows for the axis."""


def gantt_svg(
    view: Overview,
    *,
    inline: bool = False,
    tz: dt.tzinfo | None = None,
    layout: Layout | None = None,
) -> Markup:
    """``tz``: the zone of the axis labels (default: this machine's)."""
    box = layout or Layout()
    zone = tz or dt.datetime.now().astimezone().tzinfo
    waves = [w for w in view.waves if w.counts.total]
    start, end = _span(view, waves)
    chart = box.width - box.label - box.right
    minutes = max((end - start).total_seconds() / 60.0, 1.0)

    def x(at: dt.datetime) -> float:
        offset = (at - start).total_seconds() / 60.0
        return round(box.label + chart * min(max(offset / minutes, 0.0), 1.0), 1)

    height = box.top + box.row * len(waves) + 16
    parts: list[Markup] = [_defs(), _axis(start, minutes, x, box, height, zone)]
    for index, wave in enumerate(waves):
        parts.append(_row(view, wave, box.top + index * box.row, x, box, zone))
    now = x(view.at)
    parts.append(tag("line", x1=now, x2=now, y1=box.top - 6, y2=height - 13, stroke=STUCK, stroke_width=1.5))
    parts.append(tag("text", "now", x=now, y=height - 3, fill=STUCK, font_size=10, text_anchor="middle"))
    return tag(
        "svg",
        parts,
        xmlns=None if inline else SVG_NAMESPACE,
        width=box.width,
        height=height,
        viewBox=f"0 0 {box.width} {height}",
        role="img",
        aria_label="Timeline of the restore per wave: plan, done, forecast",
        font_family="DejaVu Sans, Verdana, sans-serif",
        class_="timeline",
    )


def _span(view: Overview, waves: Sequence[WaveView]) -> tuple[dt.datetime, dt.datetime]:
    start = view.started or view.at
    origin = start
    ends = [view.at]
    for wave in waves:
        for minutes in (wave.eta_minutes, wave.eta_others_minutes):
            if minutes is not None:
                ends.append(view.at + dt.timedelta(minutes=minutes))
        if wave.planned_finish_minutes is not None:
            ends.append(origin + dt.timedelta(minutes=wave.planned_finish_minutes))
        if wave.finished_at is not None:
            ends.append(wave.finished_at)
    end = max(ends)
    # Some room after the last mark, so that an open-ended bar reads as open.
    end += max((end - start) * 0.04, dt.timedelta(minutes=1))
    return start, end


def _defs() -> Markup:
    stripes = tag(
        "pattern",
        tag("rect", width=6, height=6, fill=FORECAST, fill_opacity=0.35),
        tag("line", x1=0, y1=0, x2=0, y2=6, stroke=FORECAST, stroke_width=3),
        id="forecast-stripes",
        width=6,
        height=6,
        patternUnits="userSpaceOnUse",
        patternTransform="rotate(45)",
    )
    return tag("defs", stripes)


def _axis(
    start: dt.datetime,
    minutes: float,
    x: Scale,
    box: Layout,
    height: int,
    zone: dt.tzinfo | None,
) -> Markup:
    step = next((t for t in _TICKS if minutes / t <= 8), _TICKS[-1])
    local = start.astimezone(zone)
    first = local.replace(second=0, microsecond=0)
    # Ticks on round local times (06:00, 06:30...), not at odd offsets from the first stage.
    since_midnight = first.hour * 60 + first.minute
    first += dt.timedelta(minutes=(-since_midnight) % step)
    ticks = []
    at = first
    while at <= start + dt.timedelta(minutes=minutes):
        position = x(at)
        label = at.strftime("%d %b" if (at.hour, at.minute) == (0, 0) else "%H:%M")
        ticks.append(
            join(
                tag("line", x1=position, x2=position, y1=box.top - 4, y2=height - 13, stroke="#dddddd"),
                tag("text", label, x=position, y=12, font_size=10, fill="#444444", text_anchor="middle"),
            )
        )
        at += dt.timedelta(minutes=step)
    return tag("g", ticks, class_="axis")


def _row(
    view: Overview,
    wave: WaveView,
    top: int,
    x: Scale,
    box: Layout,
    zone: dt.tzinfo | None,
) -> Markup:
    middle = top + box.row / 2
    parts: list[Markup] = [
        tag("text", wave.name, x=4, y=middle - 1, font_size=12, font_weight="bold", fill="#222222"),
        tag("text", f"{wave.counts.percent:g} %", x=4, y=middle + 11, font_size=10, fill="#444444"),
        tag(
            "rect",
            x=box.label,
            y=top + 4,
            width=box.width - box.label - box.right,
            height=box.row - 8,
            fill="#f3f3f3",
        ),
    ]
    origin = view.started or view.at
    if wave.planned_finish_minutes is not None:
        plan_start = x(origin + dt.timedelta(minutes=wave.planned_start_minutes or 0.0))
        plan_end = x(origin + dt.timedelta(minutes=wave.planned_finish_minutes))
        parts.append(
            tag(
                "rect",
                x=plan_start,
                y=top + 5,
                width=max(plan_end - plan_start, 1.5),
                height=5,
                fill="none",
                stroke=PLAN,
                stroke_width=1,
                class_="plan",
            )
        )
    bar_top, bar_height = top + 12, box.row - 18
    if wave.first_started is not None:
        until = wave.finished_at or view.at
        begin = x(wave.first_started)
        parts.append(
            tag(
                "rect",
                x=begin,
                y=bar_top,
                width=max(x(until) - begin, 1.5),
                height=bar_height,
                fill=DONE if wave.done else RUNNING,
                class_="done",
            )
        )
    finish_label: str
    if wave.done and wave.finished_at is not None:
        finish_label = f"back {_clock(wave.finished_at, zone, view.at)}"
    else:
        now = x(view.at)
        begin_at = view.at + dt.timedelta(minutes=wave.eta_start_minutes or 0.0)
        begin = x(begin_at) if wave.first_started is None else now
        if wave.eta_minutes is not None:
            end = x(view.at + dt.timedelta(minutes=wave.eta_minutes))
            parts.append(
                tag(
                    "rect",
                    x=begin,
                    y=bar_top,
                    width=max(end - begin, 1.5),
                    height=bar_height,
                    fill="url(#forecast-stripes)",
                    stroke=FORECAST,
                    stroke_width=0.5,
                    class_="forecast",
                )
            )
            finish_label = f"ETA {_clock(view.at + dt.timedelta(minutes=wave.eta_minutes), zone, view.at)}"
        else:
            end = x(view.at + dt.timedelta(minutes=wave.eta_others_minutes or 0.0))
            parts.append(
                tag(
                    "rect",
                    x=begin,
                    y=bar_top,
                    width=max(end - begin, 1.5),
                    height=bar_height,
                    fill="url(#forecast-stripes)",
                    stroke=STUCK,
                    stroke_width=1,
                    stroke_dasharray="3 2",
                    class_="forecast stuck",
                )
            )
            finish_label = f"{len(wave.will_not_finish)} stuck"
    curve = _curve(wave, top, x, box)
    if curve is not None:
        parts.append(curve)
    parts.append(
        tag(
            "text",
            finish_label,
            x=box.width - box.right + 6,
            y=middle + 4,
            font_size=11,
            fill=STUCK if not wave.done and wave.eta_minutes is None else "#222222",
        )
    )
    return tag("g", parts, class_="wave")


def _curve(wave: WaveView, top: int, x: Scale, box: Layout) -> Markup | None:
    """The share online over time, sampled to at most 120 points (1,000 hosts need no more)."""
    times = wave.online_times
    if not times or not wave.counts.total:
        return None
    step = max(1, len(times) // 120)
    sampled = list(range(0, len(times), step))
    if sampled[-1] != len(times) - 1:
        sampled.append(len(times) - 1)
    low, high = top + box.row - 5, top + 5
    points = []
    if wave.first_started is not None:
        points.append(f"{x(wave.first_started)},{low}")
    for index in sampled:
        share = (index + 1) / wave.counts.total
        points.append(f"{x(times[index])},{round(low - (low - high) * share, 1)}")
    return tag(
        "polyline",
        points=" ".join(points),
        fill="none",
        stroke="#111111",
        stroke_width=1.2,
        class_="online-curve",
    )


def _clock(at: dt.datetime, zone: dt.tzinfo | None, today: dt.datetime) -> str:
    """'05:40', or 'Tue 05:40' when it is not on the same day as ``today``."""
    local = at.astimezone(zone)
    same_day = local.date() == today.astimezone(zone).date()
    return local.strftime("%H:%M" if same_day else "%a %H:%M")
