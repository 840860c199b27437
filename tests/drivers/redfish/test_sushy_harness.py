"""The sushy-emulator harness refuses what would make a test lie, and skips or fails visibly without sushy."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.sushy import REQUIRED_ENV, SushySystem, require_sushy, sushy_emulator


def test_missing_sushy_skips_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRED_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="sushy-emulator is not installed"):
        require_sushy(lambda: None)


def test_missing_sushy_fails_when_peers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRED_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"not installed.*{REQUIRED_ENV}=1"):
        require_sushy(lambda: None)


def test_a_notifier_needs_somewhere_to_notify(tmp_path: Path) -> None:
    # Without it sushy notifies localhost:9999, and every power change of the system answers 500.
    with (
        pytest.raises(ValueError, match="needs notify_url"),
        sushy_emulator(tmp_path, [SushySystem("a", external_notifier=True)]),
    ):
        pass


def test_only_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only use loopback"), sushy_emulator(tmp_path, address="10.0.0.1"):
        pass
