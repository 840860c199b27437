"""The private key never shows: not in logs (ours and paramiko's, at DEBUG), not in errors."""

from __future__ import annotations

import dataclasses
import logging
import traceback

import pytest

from restore_flows.drivers.base import DriverError
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell
from tests.peers.sshd import SshdHost, generate_key_pair

pytestmark = pytest.mark.slow


def fragments(private_text: str) -> list[str]:
    """The whole key and each base64 line of its body."""
    body = [line for line in private_text.splitlines() if line and not line.startswith("-----")]
    return [private_text.strip(), *body]


def everything_said(error: BaseException) -> str:
    """The error, its chain and its traceback, as a log handler or a crash report would show them."""
    return "".join(traceback.format_exception(error)) + repr(error)


def test_no_private_key_in_logs_or_errors(peers: list[SshdHost], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="paramiko")
    good, wrong = peers[0], generate_key_pair()
    broken = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWJ1dC1icm9rZW4tcHJpdmF0ZS1rZXktbWF0ZXJpYWw=\n"
    secrets = FakeSecrets({"good": good.client_key_text, "wrong": wrong.private_text, "broken": broken})
    said: list[str] = []

    with ParamikoShell(secrets) as shell:
        for name in ("good", "wrong", "broken"):
            host = good.inventory_host(name)
            assert host.ssh is not None
            host = dataclasses.replace(host, ssh=host.ssh.model_copy(update={"key_secret": name}))
            try:
                said.append(shell.run(host, "echo ok", timeout=10).stdout)
            except DriverError as exc:
                said.append(everything_said(exc))

    assert said[0] == "ok\n"
    assert "refused for the key in secret 'wrong'" in said[1]
    assert "secret 'broken' does not hold" in said[2]
    assert any(record.name.startswith("paramiko") for record in caplog.records), "paramiko's log not captured"
    text = caplog.text + "".join(said)
    for private_text in (good.client_key_text, wrong.private_text, broken):
        for fragment in fragments(private_text):
            assert fragment not in text
