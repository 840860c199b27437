"""Running commands through ParamikoShell against real sshd: results, output limits, connection reuse,
concurrency on one host and across hosts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from restore_flows.drivers.commands import Dialect, render
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import OUTPUT_LIMIT, ParamikoShell
from tests.peers.sshd import SshdHost

pytestmark = pytest.mark.slow


def test_exit_status_stdout_and_stderr_come_back_apart(shell: ParamikoShell, peer: SshdHost) -> None:
    result = shell.run(peer.inventory_host(), "printf 'out\\n'; printf 'err\\n' >&2; exit 7", timeout=10)

    assert (result.exit_status, result.stdout, result.stderr, result.truncated) == (
        7,
        "out\n",
        "err\n",
        False,
    )


def test_bytes_that_are_not_utf8_are_replaced(shell: ParamikoShell, peer: SshdHost) -> None:
    result = shell.run(peer.inventory_host(), "printf 'caf\\303\\251 \\377!'", timeout=10)

    assert result.stdout == "café \ufffd!"


def test_output_up_to_the_limit_is_kept_whole(shell: ParamikoShell, peer: SshdHost) -> None:
    result = shell.run(peer.inventory_host(), f"head -c {OUTPUT_LIMIT} /dev/zero | tr '\\0' a", timeout=10)

    assert (len(result.stdout), result.truncated) == (OUTPUT_LIMIT, False)


def test_output_beyond_the_limit_is_cut_and_the_command_still_finishes(
    shell: ParamikoShell, peer: SshdHost
) -> None:
    # 1 MiB on each stream, more than the channel window: the command only ends if both are drained.
    big = 1024 * 1024
    command = f"head -c {big} /dev/zero | tr '\\0' o; head -c {big} /dev/zero | tr '\\0' e >&2; exit 3"

    result = shell.run(peer.inventory_host(), command, timeout=20)

    assert result.exit_status == 3
    assert result.truncated
    assert result.stdout == "o" * OUTPUT_LIMIT
    assert result.stderr == "e" * OUTPUT_LIMIT


def test_a_stream_that_only_writes_stderr_cannot_stall_the_command(
    shell: ParamikoShell, peer: SshdHost
) -> None:
    command = "head -c 3000000 /dev/zero >&2; echo done"

    result = shell.run(peer.inventory_host(), command, timeout=20)

    assert (result.exit_status, result.stdout, result.truncated) == (0, "done\n", True)


def test_one_connection_serves_many_commands(shell: ParamikoShell, peer: SshdHost) -> None:
    host = peer.inventory_host()

    outputs = [shell.run(host, f"echo {i}", timeout=10).stdout for i in range(25)]

    assert outputs == [f"{i}\n" for i in range(25)]
    assert shell.connects == 1
    assert peer.accepted_logins() == 1


def test_concurrent_commands_on_one_host_run_at_once_over_one_connection(
    peer: SshdHost, secrets: FakeSecrets, tmp_path: Path
) -> None:
    # Each command waits on the host until all of them have started: if the driver ran them one after
    # another, none would ever see the others and each would give up with exit 9.
    width = 8
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    command = render(
        'touch {dir}/"$$"; n=0; while [ "$(ls {dir} | wc -l)" -lt {width} ]; do '
        'n=$((n+1)); [ "$n" -gt 1000 ] && exit 9; sleep 0.01; done; echo met',
        Dialect.POSIX,
        {"dir": str(rendezvous), "width": width},
    )
    host = peer.inventory_host()

    with (
        ParamikoShell(secrets, max_sessions_per_host=width) as shell,
        ThreadPoolExecutor(width) as pool,
    ):
        results = list(pool.map(lambda _: shell.run(host, command, timeout=30), range(width)))
        connects = shell.connects

    assert [(r.exit_status, r.stdout) for r in results] == [(0, "met\n")] * width
    assert connects == 1
    assert peer.accepted_logins() == 1


def test_the_per_host_cap_bounds_sessions_on_one_host(
    peer: SshdHost, secrets: FakeSecrets, tmp_path: Path
) -> None:
    # Each command reports how many commands it sees running (itself included) while it runs.
    running = tmp_path / "running"
    running.mkdir()
    command = render(
        'touch {dir}/"$$"; ls {dir} | wc -l; sleep 0.2; rm {dir}/"$$"',
        Dialect.POSIX,
        {"dir": str(running)},
    )
    host = peer.inventory_host()

    with ParamikoShell(secrets, max_sessions_per_host=2) as shell, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: shell.run(host, command, timeout=30), range(8)))

    seen = [int(r.stdout) for r in results]
    assert max(seen) == 2, seen


def test_commands_across_hosts_each_use_their_own_connection(
    peers: list[SshdHost], secrets: FakeSecrets
) -> None:
    hosts = [peer.inventory_host(f"host-{i}") for i, peer in enumerate(peers)]
    jobs = [(host, n) for host in hosts for n in range(4)]

    with ParamikoShell(secrets) as shell, ThreadPoolExecutor(12) as pool:
        # sshd puts "client-address client-port server-address server-port" in SSH_CONNECTION.
        results = list(pool.map(lambda job: shell.run(job[0], 'echo "$SSH_CONNECTION"', timeout=30), jobs))
        connects = shell.connects

    reached = [result.stdout.split()[2] for result in results]
    assert reached == [host.address for host, _ in jobs]
    assert connects == len(peers)
    assert [peer.accepted_logins() for peer in peers] == [1] * len(peers)


def test_a_connection_lost_to_a_reboot_is_replaced(shell: ParamikoShell, peer: SshdHost) -> None:
    host = peer.inventory_host()
    assert shell.run(host, "echo before", timeout=10).stdout == "before\n"

    peer.restart()

    assert shell.run(host, "echo after", timeout=10).stdout == "after\n"
    assert shell.connects == 2
