"""Key handling: host key lines, private key formats (each logging in to real sshd), the socket."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell, describe_key, parse_host_key, tcp_socket
from tests.peers.sshd import CLIENT_KEY_SECRET, SshdHost, generate_key_pair


def test_a_host_key_line_parses_with_or_without_a_comment() -> None:
    pair = generate_key_pair()

    plain = parse_host_key(pair.public_line)
    commented = parse_host_key(pair.public_line + " root@ws-042")

    assert plain == commented
    assert describe_key(plain).startswith("ssh-ed25519 SHA256:")


@pytest.mark.parametrize("line", ["", "ssh-ed25519", "ssh-ed25519 %%%", "ssh-foo AAAA"])
def test_a_line_that_is_not_a_host_key_is_rejected(line: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each line fails for its own reason
        parse_host_key(line)


def _rsa_pem() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()).decode()
    return private, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def _ecdsa_pem() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    return private, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def _ed25519_openssh() -> tuple[str, str]:
    pair = generate_key_pair()
    return pair.private_text, pair.public_line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_key", "label"),
    [(_rsa_pem, "RSA"), (_ecdsa_pem, "ECDSA"), (_ed25519_openssh, "ED25519")],
    ids=["rsa-pem", "ecdsa-pkcs8", "ed25519-openssh"],
)
def test_each_private_key_format_logs_in(
    peer: SshdHost, make_key: Callable[[], tuple[str, str]], label: str
) -> None:
    private, public = make_key()
    peer.authorize(public)

    with ParamikoShell(FakeSecrets({CLIENT_KEY_SECRET: private})) as shell:
        result = shell.run(peer.inventory_host(), "echo in", timeout=10)

    assert result.stdout == "in\n"
    # sshd names the key it accepted: this one, not the harness's own client key.
    assert f"Accepted publickey for {peer.user} " in peer.log()
    assert f"ssh2: {label} {parse_host_key(public).fingerprint}" in peer.log()


@pytest.mark.slow
def test_the_socket_has_nagle_off_and_the_factory_is_used(peer: SshdHost, secrets: FakeSecrets) -> None:
    opened: list[socket.socket] = []

    def connect(address: str, port: int, timeout: float) -> socket.socket:
        sock = tcp_socket(address, port, timeout)
        opened.append(sock)
        return sock

    with ParamikoShell(secrets, connect=connect) as shell:
        for _ in range(3):
            shell.run(peer.inventory_host(), "true", timeout=10)
        assert len(opened) == 1
        (sock,) = opened
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getpeername() == (peer.address, peer.port)
