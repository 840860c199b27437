"""Secrets by name from Prefect Secret blocks on a real Prefect server, and the chain with the environment."""

from __future__ import annotations

import pytest
from prefect.blocks.system import Secret

from restore_flows.drivers.secrets import (
    ChainedSecrets,
    EnvSecrets,
    PrefectSecrets,
    SecretNotFound,
    secrets_from,
    split_credentials,
)
from restore_flows.flows.server import PrefectServer


@pytest.fixture
def api(prefect_api: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> PrefectServer:
    for name, value in prefect_api.client_env({}).items():
        monkeypatch.setenv(name, value)
    return prefect_api


def test_a_secret_block_is_found_by_the_inventorys_name(api: PrefectServer) -> None:
    Secret(value="admin:Blk-pa55:word").save("bmc-arl-ward-3", overwrite=True)
    secret = PrefectSecrets().get("bmc/arl_ward.3")  # any name the inventory allows maps to a slug
    user, password = split_credentials("bmc/arl_ward.3", secret)
    assert (user, password.get_secret_value()) == ("admin", "Blk-pa55:word")
    assert "Blk-pa55" not in repr(secret)
    assert "Blk-pa55" not in str(password)
    with pytest.raises(SecretNotFound, match="'no-such' is not a Prefect Secret block") as missing:
        PrefectSecrets().get("no-such")
    assert missing.value.__cause__ is None


def test_the_environment_comes_first_then_prefect(api: PrefectServer) -> None:
    Secret(value="from-prefect").save("ssh-key-icu", overwrite=True)
    chain = secrets_from("env,prefect")
    assert chain.get("ssh-key-icu").get_secret_value() == "from-prefect"
    both = ChainedSecrets((EnvSecrets({"RESTORE_SECRET_SSH_KEY_ICU": "from-env"}), PrefectSecrets()))
    assert both.get("ssh-key-icu").get_secret_value() == "from-env"
    with pytest.raises(SecretNotFound, match=r"RESTORE_SECRET_NOPE.*not a Prefect Secret block"):
        chain.get("nope")
    with pytest.raises(SecretNotFound, match="unknown secret source 'vault'"):
        secrets_from("env,vault")
