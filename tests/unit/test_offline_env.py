"""The settings that keep Prefect from calling out, as every process the project starts gets them."""

from __future__ import annotations

import subprocess
import sys

from restore_flows.offline import DEAD_END_PROXY, server_env, stay_offline


def test_clients_get_telemetry_off() -> None:
    environ: dict[str, str] = {"DO_NOT_TRACK": "0"}
    stay_offline(environ)
    assert environ["DO_NOT_TRACK"] == "1"
    assert environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_the_server_reaches_itself_directly_and_nothing_else() -> None:
    env = server_env("10.20.0.5")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        assert env[name] == env[name.lower()] == DEAD_END_PROXY
    assert env["NO_PROXY"].split(",") == ["localhost", "127.0.0.1", "::1", "10.20.0.5"]
    assert server_env("127.0.0.1")["no_proxy"].split(",") == ["localhost", "127.0.0.1", "::1"]


def test_the_restore_command_turns_telemetry_off_before_prefect_loads() -> None:
    probe = (
        "import os, sys\n"
        "import restore_flows.cli as cli\n"
        "assert 'prefect' not in sys.modules\n"
        "cli.app = lambda: print(os.environ.get('DO_NOT_TRACK'), 'prefect' in sys.modules)\n"
        "cli.main()\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    shown = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    assert shown.stdout.split() == ["1", "False"]
