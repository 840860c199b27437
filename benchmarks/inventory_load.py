"""Time load + validate + plan for the sample estate and for generated estates 10x and 100x larger.

The larger estates copy the sample's hosts (fully expanded: one YAML entry per host, no ranges, no
groups), renaming each copy so that dependencies stay inside their copy. The baseline in the same run
is PyYAML's own C loader reading the same files with no line numbers and no validation: the figure
to watch is how much our line-aware load, validation and planning add on top of bare parsing.

    .venv/bin/python benchmarks/inventory_load.py [--inventory inventory] [--sizes 1,10,100]
        [--chains 2000,5000]

``--chains`` also plans estates that are one dependency chain (each host needs the one before, and only
the last is in the first wave, so that every other host is pulled forward): load, plan, and the plan
as ``restore plan`` prints it. Time and output must grow linearly with the chain.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from restore_flows import render
from restore_flows.inventory.loader import load_inventory
from restore_flows.planning import plan

HOSTS_PER_FILE = 10_000


def generate(sample: Path, factor: int, out: Path) -> int:
    """Write an estate ``factor`` times the sample into ``out``; returns the number of hosts."""
    result = load_inventory(sample)
    if result.estate is None:
        sys.exit("the sample inventory does not validate: run 'restore validate' first")
    base: dict[str, list[Any]] = {"waves": [], "sites": [], "pools": [], "roles": []}
    for path in sorted(sample.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for section, items in base.items():
            items.extend(data.get(section, []))
    out.mkdir(parents=True, exist_ok=True)
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    lines: list[str] = []
    count = 0
    file_number = 0

    def flush() -> None:
        nonlocal lines, file_number
        if lines:
            (out / f"hosts-{file_number:03d}.yaml").write_text("hosts:\n" + "\n".join(lines) + "\n")
            file_number += 1
            lines = []

    for copy in range(factor):
        suffix = "" if copy == 0 else f"-r{copy}"
        for host in result.estate.hosts.values():
            depends = ", ".join(f"{d}{suffix}" for d in host.depends_on)
            pools = ", ".join(f"{stage.value}: [{', '.join(p)}]" for stage, p in host.pools.items())
            lines.append(
                f"  - name: {host.name}{suffix}\n"
                f"    kind: {host.kind.value}\n"
                f"    site: {host.site}\n"
                f"    role: {host.role}\n"
                f"    department: {host.department}\n"
                f"    services: [{', '.join(host.services)}]\n"
                f"    depends_on: [{depends}]\n"
                f"    pools: {{{pools}}}"
            )
            count += 1
            if len(lines) >= HOSTS_PER_FILE:
                flush()
    flush()
    return count


def time_ours(directory: Path) -> tuple[float, int]:
    started = time.perf_counter()
    result = load_inventory(directory)
    if result.estate is None:
        raise SystemExit("\n".join(str(d) for d in result.errors[:20]))
    the_plan = plan(result.estate)
    elapsed = time.perf_counter() - started
    return elapsed, len(the_plan.hosts)


def write_chain(length: int, out: Path) -> None:
    lines = [
        "waves: [{name: core, services: [identity]}, {name: rest, services: ['*']}]",
        "sites: [{name: dc1, kind: datacenter}]",
        "roles: [{name: dc, kind: server, services: [identity]}, {name: app, kind: server}]",
        "hosts:",
        "  - {name: h-000000, role: app, site: dc1}",
    ]
    for index in range(1, length):
        role = "dc" if index == length - 1 else "app"
        lines.append(f"  - {{name: h-{index:06d}, role: {role}, site: dc1, depends_on: [h-{index - 1:06d}]}}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "chain.yaml").write_text("\n".join(lines) + "\n")


def time_chain(directory: Path) -> tuple[float, float, int]:
    """Seconds to load and plan, seconds to print the plan, and the printed plan's size in bytes."""
    started = time.perf_counter()
    result = load_inventory(directory)
    assert result.estate is not None
    the_plan = plan(result.estate)
    planned = time.perf_counter() - started
    printed = io.StringIO()
    started = time.perf_counter()
    render.plan(Console(file=printed, width=160), the_plan)
    return planned, time.perf_counter() - started, len(printed.getvalue().encode())


def time_baseline(directory: Path) -> float:
    started = time.perf_counter()
    for path in sorted(directory.rglob("*.yaml")):
        yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=Path("inventory"))
    parser.add_argument("--sizes", default="1,10,100", help="Multiples of the sample estate.")
    parser.add_argument("--chains", default="", help="Lengths of dependency chains to plan, e.g. 2000,5000.")
    parser.add_argument("--json", action="store_true", help="Also print the figures as JSON.")
    args = parser.parse_args()
    rows: list[dict[str, float | int]] = []
    print(f"{'size':>6} {'hosts':>9} {'ours s':>8} {'baseline s':>11} {'ratio':>6} {'us/host':>8}")
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as scratch:
        for factor in (int(s) for s in args.sizes.split(",")):
            if factor == 1:
                directory = args.inventory
            else:
                directory = Path(scratch) / f"x{factor}"
                generate(args.inventory, factor, directory)
            ours, hosts = time_ours(directory)
            baseline = time_baseline(directory)
            row = {
                "factor": factor,
                "hosts": hosts,
                "seconds": round(ours, 3),
                "baseline_seconds": round(baseline, 3),
                "ratio": round(ours / baseline, 2),
                "us_per_host": round(ours / hosts * 1e6, 1),
            }
            rows.append(row)
            print(
                f"{'x' + str(factor):>6} {hosts:>9,} {ours:>8.2f} {baseline:>11.2f} "
                f"{ours / baseline:>6.2f} {ours / hosts * 1e6:>8.1f}",
                flush=True,
            )
    expanded = [r for r in rows if int(r["factor"]) > 1]
    if len(expanded) > 1:
        # The sample uses ranges and groups; the generated estates are fully expanded, so growth is
        # judged between generated sizes only.
        first, last = expanded[0], expanded[-1]
        growth = float(last["us_per_host"]) / float(first["us_per_host"])
        print(
            f"growth: {last['hosts']:,} hosts cost {growth:.2f}x per host what {first['hosts']:,} do "
            "(1.00 = linear)"
        )
    chains = [int(c) for c in args.chains.split(",") if c]
    if chains:
        print(f"{'chain':>7} {'load+plan s':>12} {'print s':>8} {'plan bytes':>11} {'bytes/host':>11}")
    with tempfile.TemporaryDirectory(prefix="restore-chain-") as scratch:
        for length in chains:
            directory = Path(scratch) / f"chain{length}"
            write_chain(length, directory)
            planned, printed, size = time_chain(directory)
            rows.append(
                {
                    "chain": length,
                    "seconds": round(planned, 3),
                    "print_seconds": round(printed, 3),
                    "bytes": size,
                }
            )
            print(
                f"{length:>7,} {planned:>12.2f} {printed:>8.2f} {size:>11,} {size / length:>11.0f}",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
