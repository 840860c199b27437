"""SSH fan-out: verify 100 hosts at once through ParamikoShell, against plain paramiko in the same run.

Each host is a real OpenSSH sshd of its own on loopback (its own 127.x.y.z address, port and host key;
the test harness :mod:`tests.peers.sshd`, importable through the project's editable install). Every
host gets the same checks (4 by default, each a command), all through one thread pool:

(a) baseline, plain paramiko as it is usually written: per host one ``SSHClient`` (host key pinned,
    ``RejectPolicy``), the checks one after another with ``exec_command``, then close. One task per host.
(b) the same with a ``TCP_NODELAY`` socket passed in: how much of (a) is Nagle's delay.
(c) ParamikoShell, cold: one task per (host, check), so a host's checks run at once on channels of one
    connection; every host's first command connects.
(d) ParamikoShell, warm: the same again on the connections (c) left open.

A check fails on any error, a non-zero exit or unexpected output. Each variant runs ``--rounds`` times
(a fresh ParamikoShell per round) and the round with the median wall time is shown, with the failures
of all rounds. The figure is commands per second of wall time; the ratio compares (c) with (a). Target:
0 failures, (c) at least half as fast as (a). Last, one host's commands one after another on one
connection, where Nagle's delay shows undiluted.

On two cores the fan-out is CPU-bound (sshd forks and re-executes itself per login and starts a shell per
command; paramiko's packet layer is Python), so the cold figures mostly measure logins. Running the
checks as one task per host instead of one per (host, check) measured the same within the noise.

    .venv/bin/python benchmarks/ssh_fanout.py [--hosts 100] [--checks 4] [--workers 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paramiko

from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell, load_private_key, parse_host_key, tcp_socket
from restore_flows.inventory.estate import Host
from tests.peers.sshd import CLIENT_KEY_SECRET, SshdHost, sshd_hosts

CHECKS: list[tuple[str, str]] = [
    ("echo verified", "verified\n"),
    ("uname -s", "Linux\n"),
    ("test -r /etc/passwd && echo readable", "readable\n"),
    ('printf "%s\\n" "$SSH_CONNECTION" | wc -w', "4\n"),
]
"""(command, expected stdout): cheap, like the host facts a verification collects."""


@dataclass(frozen=True)
class Figures:
    seconds: float
    commands: int
    failures: int
    first_failure: str = ""

    @property
    def per_second(self) -> float:
        return self.commands / self.seconds

    def line(self, label: str) -> str:
        text = (
            f"{label:<44} {self.seconds:6.2f} s  {self.per_second:7.1f} commands/s  {self.failures} failures"
        )
        return text + (f"  (first: {self.first_failure})" if self.first_failure else "")


def plain_paramiko(
    peers: list[SshdHost], checks: list[tuple[str, str]], workers: int, *, nodelay: bool
) -> Figures:
    pkey = load_private_key(peers[0].client_key_text)

    def verify(peer: SshdHost) -> list[str]:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = parse_host_key(peer.host_key_line)
        client.get_host_keys().add(f"[{peer.address}]:{peer.port}", key.get_name(), key)
        sock = tcp_socket(peer.address, peer.port, 10) if nodelay else None
        failures = []
        try:
            client.connect(
                peer.address,
                port=peer.port,
                username=peer.user,
                pkey=pkey,
                sock=sock,
                timeout=10,
                allow_agent=False,
                look_for_keys=False,
            )
            for command, expected in checks:
                _, stdout, stderr = client.exec_command(command, timeout=10)
                out = stdout.read().decode()
                status = stdout.channel.recv_exit_status()
                stderr.read()
                if status != 0 or out != expected:
                    failures.append(f"{peer.address} {command!r}: exit {status}, {out!r}")
        except Exception as exc:
            failures.append(f"{peer.address}: {type(exc).__name__}: {exc}")
        finally:
            client.close()
            if sock is not None:
                sock.close()
        return failures

    return _timed(
        lambda pool: [f for fs in pool.map(verify, peers) for f in fs], workers, len(peers) * len(checks)
    )


def through_shell(
    shell: ParamikoShell, hosts: list[Host], checks: list[tuple[str, str]], workers: int
) -> Figures:
    jobs = [(host, command, expected) for host in hosts for command, expected in checks]

    def check(job: tuple[Host, str, str]) -> list[str]:
        host, command, expected = job
        try:
            result = shell.run(host, command, timeout=30)
        except Exception as exc:
            return [f"{host.name}: {exc}"]
        if result.exit_status != 0 or result.stdout != expected:
            return [f"{host.name} {command!r}: exit {result.exit_status}, {result.stdout!r}"]
        return []

    return _timed(lambda pool: [f for fs in pool.map(check, jobs) for f in fs], workers, len(jobs))


def sequential_latency(peer: SshdHost, host: Host, commands: int = 50) -> tuple[float, float, float]:
    """Milliseconds per command, one after another on one open connection: plain paramiko with its
    default socket, plain paramiko with TCP_NODELAY, ParamikoShell."""
    pkey = load_private_key(peer.client_key_text)
    key = parse_host_key(peer.host_key_line)
    figures = []
    for nodelay in (False, True):
        with paramiko.SSHClient() as client:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.get_host_keys().add(f"[{peer.address}]:{peer.port}", key.get_name(), key)
            sock = tcp_socket(peer.address, peer.port, 10) if nodelay else None
            client.connect(
                peer.address,
                port=peer.port,
                username=peer.user,
                pkey=pkey,
                sock=sock,
                allow_agent=False,
                look_for_keys=False,
            )
            started = time.perf_counter()
            for _ in range(commands):
                _, stdout, stderr = client.exec_command("true", timeout=10)
                stdout.read()
                stderr.read()
                stdout.channel.recv_exit_status()
            figures.append((time.perf_counter() - started) / commands * 1000)
            if sock is not None:
                sock.close()
    with ParamikoShell(FakeSecrets({CLIENT_KEY_SECRET: peer.client_key_text})) as shell:
        shell.run(host, "true", timeout=10)
        started = time.perf_counter()
        for _ in range(commands):
            shell.run(host, "true", timeout=10)
        figures.append((time.perf_counter() - started) / commands * 1000)
    return figures[0], figures[1], figures[2]


def _timed(work: Callable[[ThreadPoolExecutor], list[str]], workers: int, commands: int) -> Figures:
    with ThreadPoolExecutor(workers) as pool:
        started = time.perf_counter()
        failures = work(pool)
        seconds = time.perf_counter() - started
    return Figures(seconds, commands, len(failures), failures[0] if failures else "")


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (libcrypto, sshd itself) counted once across the listeners,
    where summing each one's resident size would count them 100 times."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def median(figures: list[Figures]) -> Figures:
    """The round with the median wall time, carrying the failures of every round."""
    middle = sorted(figures, key=lambda f: f.seconds)[len(figures) // 2]
    failures = [f.first_failure for f in figures if f.first_failure]
    return Figures(
        middle.seconds, middle.commands, sum(f.failures for f in figures), failures[0] if failures else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--checks", type=int, default=4, help=f"commands per host (at most {len(CHECKS)})")
    parser.add_argument("--workers", type=int, default=32, help="threads in the pool, for every variant")
    parser.add_argument("--rounds", type=int, default=3, help="each variant this often; the median counts")
    args = parser.parse_args()
    checks = CHECKS[: args.checks]
    runs: dict[str, list[Figures]] = {variant: [] for variant in "abcd"}

    with tempfile.TemporaryDirectory(prefix="restore-ssh-bench-") as scratch:
        started = time.perf_counter()
        with sshd_hosts(Path(scratch), args.hosts) as peers:
            print(
                f"{args.hosts} sshd hosts on loopback started in {time.perf_counter() - started:.2f} s; "
                f"{len(checks)} checks each, {args.workers} threads, {args.rounds} rounds",
                flush=True,
            )
            pss = sum(_pss_kib(peer.pid) for peer in peers if peer.pid is not None) / 1024
            print(
                f"the {args.hosts} idle sshd listeners use {pss:.0f} MiB of memory (PSS) in all", flush=True
            )
            hosts = [peer.inventory_host(f"host-{i:03d}") for i, peer in enumerate(peers)]
            secrets = FakeSecrets({CLIENT_KEY_SECRET: peers[0].client_key_text})
            # Warm-up, not counted: the first login of the run pays for loading sshd and bash from disk.
            plain_paramiko(peers[:1], checks, 1, nodelay=True)
            connects = []
            for round_ in range(args.rounds):
                runs["a"].append(plain_paramiko(peers, checks, args.workers, nodelay=False))
                runs["b"].append(plain_paramiko(peers, checks, args.workers, nodelay=True))
                with ParamikoShell(secrets) as shell:
                    runs["c"].append(through_shell(shell, hosts, checks, args.workers))
                    runs["d"].append(through_shell(shell, hosts, checks, args.workers))
                    connects.append(shell.connects)
                print(
                    f"  round {round_ + 1}: "
                    + ", ".join(f"({v}) {runs[v][-1].seconds:.2f} s" for v in "abcd"),
                    flush=True,
                )
            logins = sum(peer.accepted_logins() for peer in peers)
            plain_ms, nodelay_ms, shell_ms = sequential_latency(peers[0], hosts[0])

    a, b, c, d = (median(runs[v]) for v in "abcd")
    print(f"median of {args.rounds} rounds, {a.commands} commands each:")
    print(a.line("(a) plain paramiko, one client per host"))
    print(b.line("(b) plain paramiko + TCP_NODELAY socket"))
    print(c.line("(c) ParamikoShell, cold (connects included)"))
    print(d.line("(d) ParamikoShell, warm (connections kept)"))
    print(
        f"ParamikoShell connections per round: {sorted(set(connects))} for {args.hosts} hosts; "
        f"sshd logins in all: {logins}"
    )
    print(
        f"one host, commands one after another on one connection: plain paramiko {plain_ms:.1f} ms, "
        f"+ TCP_NODELAY {nodelay_ms:.1f} ms, ParamikoShell {shell_ms:.1f} ms per command"
    )
    print(
        f"ratio (c)/(a) throughput: {c.per_second / a.per_second:.2f}   "
        f"(c)/(b): {c.per_second / b.per_second:.2f}   (d)/(a): {d.per_second / a.per_second:.2f}"
    )
    failures = a.failures + b.failures + c.failures + d.failures
    verdict = "met" if failures == 0 and c.per_second >= a.per_second / 2 else "NOT met"
    print(f"target (0 failures, (c) within 2x of (a)): {verdict}")


if __name__ == "__main__":
    main()
