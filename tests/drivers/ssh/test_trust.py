"""Host keys and logins against real sshd: pinned keys only, never trust on first use; clear errors."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import paramiko
import pytest

from restore_flows.drivers.base import DriverError
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage
from tests.peers.sshd import CLIENT_KEY_SECRET, SshdHost, generate_key_pair

pytestmark = pytest.mark.slow


def fingerprint(host_key_line: str) -> str:
    """As ``ssh-keygen -lf`` prints it, computed here rather than by the code under test."""
    blob = base64.b64decode(host_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def refused(shell: ParamikoShell, host: Host) -> DriverError:
    with pytest.raises(DriverError) as caught:
        shell.run(host, "echo hi", timeout=10)
    return caught.value


def test_a_changed_host_key_is_refused_until_the_new_one_is_pinned(
    shell: ParamikoShell, peer: SshdHost
) -> None:
    host = peer.inventory_host("ws-042")
    old = peer.host_key_line
    assert shell.run(host, "echo old", timeout=10).stdout == "old\n"

    new = peer.reimage()
    with pytest.raises(DriverError) as caught:
        shell.run(host, "echo new", timeout=10)

    error = caught.value
    assert not error.retryable
    assert (error.host, error.stage) == ("ws-042", Stage.VERIFY)
    assert "host key mismatch" in str(error)
    assert f"presented ssh-ed25519 {fingerprint(new)}" in str(error)
    assert f"pinned is ssh-ed25519 {fingerprint(old)}" in str(error)
    assert peer.accepted_logins() == 1  # no login on the impostor

    shell.pin_host_key(host, new)

    assert shell.run(host, "echo new", timeout=10).stdout == "new\n"
    assert peer.accepted_logins() == 2


def test_an_unpinned_host_is_refused_and_its_key_shown(shell: ParamikoShell, peer: SshdHost) -> None:
    error = refused(shell, peer.inventory_host("ws-042", pin=False))

    assert not error.retryable
    assert "ws-042" in str(error)
    assert "unknown host key" in str(error)
    assert fingerprint(peer.host_key_line) in str(error)
    assert "no ssh.host_key or ssh.known_hosts" in str(error)
    assert peer.accepted_logins() == 0


def test_the_key_of_another_host_is_refused(shell: ParamikoShell, peers: list[SshdHost]) -> None:
    error = refused(shell, peers[0].inventory_host(host_key=peers[1].host_key_line))

    assert not error.retryable
    assert fingerprint(peers[0].host_key_line) in str(error)
    assert fingerprint(peers[1].host_key_line) in str(error)


def test_a_known_hosts_file_pins_by_address_or_by_name(
    shell: ParamikoShell, peers: list[SshdHost], tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"{peers[1].known_hosts_line()}\n{peers[0].known_hosts_line()}\n{peers[2].known_hosts_line('db-01')}\n"
    )

    by_address = shell.run(peers[0].inventory_host("x", known_hosts=known_hosts), "echo a", timeout=10)
    by_name = shell.run(peers[2].inventory_host("db-01", known_hosts=known_hosts), "echo n", timeout=10)

    assert (by_address.stdout, by_name.stdout) == ("a\n", "n\n")


def test_a_hashed_known_hosts_entry_pins(shell: ParamikoShell, peer: SshdHost, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    hashed = paramiko.HostKeys.hash_host(f"[{peer.address}]:{peer.port}")
    known_hosts.write_text(f"{hashed} {peer.host_key_line}\n")

    result = shell.run(peer.inventory_host(known_hosts=known_hosts), "echo h", timeout=10)

    assert result.stdout == "h\n"


def test_a_known_hosts_entry_without_the_port_does_not_match_another_port(
    shell: ParamikoShell, peer: SshdHost, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{peer.address} {peer.host_key_line}\n")  # as OpenSSH: port 22 only

    error = refused(shell, peer.inventory_host(known_hosts=known_hosts))

    assert "unknown host key" in str(error)


def test_a_known_hosts_file_without_the_host_is_refused(
    shell: ParamikoShell, peers: list[SshdHost], tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(peers[1].known_hosts_line() + "\n")

    error = refused(shell, peers[0].inventory_host(known_hosts=known_hosts))

    assert not error.retryable
    assert "unknown host key" in str(error)
    assert f"known_hosts {known_hosts} has no entry" in str(error)


def test_a_missing_known_hosts_file_is_a_clear_error(
    shell: ParamikoShell, peer: SshdHost, tmp_path: Path
) -> None:
    error = refused(shell, peer.inventory_host(known_hosts=tmp_path / "absent"))

    assert not error.retryable
    assert f"known_hosts file {tmp_path / 'absent'} is unreadable" in str(error)


def test_pinning_drops_the_cached_connection(shell: ParamikoShell, peer: SshdHost) -> None:
    host = peer.inventory_host()
    shell.run(host, "true", timeout=10)

    shell.pin_host_key(host, peer.host_key_line)
    shell.run(host, "true", timeout=10)

    assert shell.connects == 2


def test_a_pinned_key_replaces_the_inventory_key(shell: ParamikoShell, peers: list[SshdHost]) -> None:
    host = peers[0].inventory_host()
    shell.run(host, "true", timeout=10)

    shell.pin_host_key(host, peers[1].host_key_line)

    with pytest.raises(DriverError, match="host key mismatch"):
        shell.run(host, "true", timeout=10)


@pytest.mark.parametrize(
    "line",
    ["", "ssh-ed25519", "ssh-ed25519 not-base64!", "ssh-rsa " + base64.b64encode(b"junk").decode()],
)
def test_pinning_something_that_is_not_a_key_is_refused(
    shell: ParamikoShell, peer: SshdHost, line: str
) -> None:
    with pytest.raises(DriverError, match="cannot pin host key") as caught:
        shell.pin_host_key(peer.inventory_host(), line, stage=Stage.REIMAGE)

    assert not caught.value.retryable
    assert caught.value.stage is Stage.REIMAGE


def test_a_key_typed_differently_from_its_blob_is_refused(shell: ParamikoShell, peer: SshdHost) -> None:
    blob = peer.host_key_line.split()[1]

    with pytest.raises(DriverError, match="cannot pin host key"):
        shell.pin_host_key(peer.inventory_host(), f"ssh-rsa {blob}")


def test_a_login_with_the_wrong_key_is_refused_clearly(peer: SshdHost) -> None:
    wrong = generate_key_pair()

    with (
        ParamikoShell(FakeSecrets({CLIENT_KEY_SECRET: wrong.private_text})) as shell,
        pytest.raises(DriverError) as caught,
    ):
        shell.run(peer.inventory_host("ws-042"), "echo hi", timeout=10)

    error = caught.value
    assert not error.retryable
    assert f"login as {peer.user!r}" in str(error)
    assert f"secret {CLIENT_KEY_SECRET!r}" in str(error)
    assert fingerprint(wrong.public_line) in str(error)
    assert "refused" in str(error)


def test_a_secret_that_is_not_a_key_is_a_clear_error(peer: SshdHost) -> None:
    with (
        ParamikoShell(FakeSecrets({CLIENT_KEY_SECRET: "hunter2"})) as shell,
        pytest.raises(DriverError) as caught,
    ):
        shell.run(peer.inventory_host(), "echo hi", timeout=10)

    assert not caught.value.retryable
    assert "does not hold an unencrypted ed25519, RSA or ECDSA private key" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert peer.log().count("Connection from") == 0  # nothing was sent to the host


def test_a_missing_secret_is_a_clear_error(peer: SshdHost) -> None:
    with ParamikoShell(FakeSecrets({})) as shell, pytest.raises(DriverError) as caught:
        shell.run(peer.inventory_host(), "echo hi", timeout=10)

    assert not caught.value.retryable
    assert f"secret {CLIENT_KEY_SECRET!r} is not set" in str(caught.value)
