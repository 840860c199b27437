"""The live-test estate: real peers on loopback and an inventory that points at them.

Fifteen hosts of one wave ("icu") and a management host. sushy-tools plays the BMCs (TLS from a test CA,
bcrypt basic auth), one OpenSSH sshd per host plays the hosts, and the test deployment server plays
PXE: when a system power-cycles with a network boot override, or a workstation is woken, the host is
"installed" (new image id on its disk, a new sshd host key) and the server reports both. Every failure
case of the live-driver issue is one host:

===========  ===============================================  =====================
host         what is wrong                                    expected end state
===========  ===============================================  =====================
gw-01..06    nothing                                          online
ws-01        nothing (a workstation: no BMC, Wake-on-LAN)     online
gw-07        the BMC refuses the credentials                  wipe_failed
gw-08        the BMC answers 500                              wipe_failed
gw-09        the BMC accepts resets, never changes power      wipe_failed
gw-10        the SSH server refuses our key                   verify_failed
gw-11        a check hangs                                    verify_failed
gw-12        a check fails (a closed TCP port)                verify_failed
gw-13        the IOC scan finds something                     quarantined
gw-14        the deployment server reports another host key   verify_failed
===========  ===============================================  =====================
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from restore_flows.drivers.fake import FakeDeployment
from restore_flows.drivers.secrets import env_variable
from tests.drivers.redfish.scripted_bmc import ScriptedBmc
from tests.peers.deploy import deploy_server
from tests.peers.sshd import SshdHost, generate_key_pair, require_peers, sshd_hosts, unavailable_reason
from tests.peers.sushy import SushyEmulator, SushySystem, loopback_http, sushy_command, sushy_emulator

IMAGE = "win2022-gold-7"
SERVERS = [f"gw-{n:02d}" for n in range(1, 7)]
GOOD = [*SERVERS, "ws-01"]
ON_SUSHY = [*SERVERS, "gw-07", "gw-10", "gw-11", "gw-12", "gw-13", "gw-14"]
WITH_SSH = [*GOOD, "gw-10", "gw-11", "gw-12", "gw-13", "gw-14"]
WS_MAC = "52:54:00:00:0a:01"
BMC_PASSWORD = "Hosp1tal:BMC-pa55"  # a ':' inside: the secret is split at the first one only
DEPLOY_TOKEN = "deploy-t0ken-9f8e7d"
STEP = "krbtgt-reset-gw"


@dataclass
class LiveEstate:
    inventory: Path
    ledger: Path
    environment: dict[str, str]
    """RESTORE_* settings and the secrets, by name, for a live run against these peers."""
    hosts: dict[str, SshdHost]
    management: SshdHost
    sushy: SushyEmulator
    client_key: str
    wrong_key: str
    first_keys: dict[str, str]
    """Each host's SSH key before the run (the one the inventory pins)."""


def _checks(host: SshdHost, name: str) -> list[dict[str, Any]]:
    root = host.directory
    checks: list[dict[str, Any]] = [
        {"type": "golden_image", "command": f"cat {root}/image-id"},
        {"type": "edr_agent", "service": "mdatp", "command": f"cat {root}/edr-state"},
        {"type": "command", "command": "echo {host} ready", "output_pattern": f"^{name} ready$"},
        {"type": "tcp_port", "port": host.port},
        {"type": "ioc_scan", "command": f"cat {root}/ioc-findings"},
    ]
    if name == "gw-11":
        checks.append({"type": "command", "command": "sleep 30", "timeout": 1})
    if name == "gw-12":
        checks.append({"type": "tcp_port", "port": 1, "timeout": 2})
    return checks


def _inventory(
    directory: Path,
    hosts: dict[str, SshdHost],
    management: SshdHost,
    sushy: Any,
    scripted: dict[str, str],
) -> Path:
    entries: list[dict[str, Any]] = []
    for name in [*[f"gw-{n:02d}" for n in range(1, 15)], "ws-01"]:
        entry: dict[str, Any] = {"name": name, "role": "gw", "site": "arl"}
        if name == "ws-01":
            entry.update(role="ws", mac=WS_MAC)
        elif name in sushy.systems:
            entry["bmc"] = {
                "address": sushy.url,
                "system_id": sushy.systems[name],
                "credentials_secret": "bmc-wrong" if name == "gw-07" else "bmc-arl",
                "ca_bundle": str(sushy.ca_bundle),
            }
        else:
            entry["bmc"] = {"address": scripted[name], "credentials_secret": "bmc-arl", "verify_tls": False}
        if name in hosts:
            peer = hosts[name]
            entry["address"] = peer.address
            entry["ssh"] = {
                "user": peer.user,
                "port": peer.port,
                "host_key": peer.host_key_line,
                "key_secret": "wrong-key" if name == "gw-10" else "ssh-client",
                "shell": "posix",
            }
            entry["checks"] = _checks(peer, name)
        entries.append(entry)
    entries.append(
        {
            "name": "mgmt-01",
            "role": "mgmt",
            "site": "arl",
            "address": management.address,
            "ssh": {
                "user": management.user,
                "port": management.port,
                "host_key": management.host_key_line,
                "key_secret": "ssh-client",
                "shell": "posix",
            },
        }
    )
    document = {
        "waves": [{"name": "icu", "services": ["icu"]}, {"name": "rest", "services": ["*"]}],
        "sites": [{"name": "arl", "kind": "hospital"}],
        "roles": [
            {"name": "gw", "kind": "server", "services": ["icu"], "golden_image": IMAGE},
            {"name": "ws", "kind": "workstation", "services": ["icu"], "golden_image": IMAGE},
            {"name": "mgmt", "kind": "server", "services": ["management"]},
        ],
        "hosts": entries,
        # A credential reset as a procedure step, on a real host: it reads its generated password
        # from standard input (kept on the peer, for the test to compare with the ledger's
        # fingerprint) and holds gw-02's release until it is done.
        "procedures": [
            {
                "name": STEP,
                "runs_on": {"host": "gw-01"},
                "needs": [{"host": "gw-01", "stage": "verify"}],
                "command": f"cat > {hosts['gw-01'].directory}/step-stdin && echo reset on {{host}}",
                "check": {"type": "command", "command": f"test -s {hosts['gw-01'].directory}/step-stdin"},
                "generates": ["KRBTGT_PASSWORD"],
                "gates": [{"hosts": ["gw-02"], "before": "release"}],
            }
        ],
    }
    directory.mkdir(parents=True)
    (directory / "estate.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return directory


@contextmanager
def live_estate(tmp: Path) -> Iterator[LiveEstate]:
    """Start every peer, write the inventory; stop everything after."""
    require_peers(unavailable_reason())
    require_peers(None if sushy_command() else "sushy-emulator is not installed")
    with ExitStack() as stack:
        peers = stack.enter_context(sshd_hosts(tmp / "sshd", len(WITH_SSH) + 1))
        hosts = dict(zip(WITH_SSH, peers, strict=False))
        management = peers[-1]
        first_keys = {name: peer.host_key_line for name, peer in hosts.items()}
        for name, peer in hosts.items():
            (peer.directory / "edr-state").write_text("active\n")
            findings = "Trojan:Win32/Emotet.PX!MTB\n" if name == "gw-13" else ""
            (peer.directory / "ioc-findings").write_text(findings)
        impostor = generate_key_pair()

        def install(host: str) -> str:
            """The deployment server installs the image: new image id on disk, new host key."""
            peer = hosts[host]
            (peer.directory / "image-id").write_text(IMAGE + "\n")
            new_key = peer.reimage()
            return impostor.public_line if host == "gw-14" else new_key

        state = FakeDeployment(new_host_key=install)
        system_names = {name: name for name in ON_SUSHY}
        deploy = stack.enter_context(deploy_server(state, system_names))
        systems = [SushySystem(name, power_state="On", external_notifier=True) for name in ON_SUSHY]
        sushy = stack.enter_context(
            sushy_emulator(
                tmp / "sushy", systems, auth=("admin", BMC_PASSWORD), tls=True, notify_url=deploy.notify_url
            )
        )
        deploy.systems.update({uuid: name for name, uuid in sushy.systems.items()})
        failing = stack.enter_context(
            loopback_http(
                lambda request: httpx.Response(500, json={"error": {"message": "BMC firmware fault"}})
            )
        )
        stuck_bmc = ScriptedBmc(user="admin", password=BMC_PASSWORD, changes_power=False, sessions=False)
        stuck = stack.enter_context(loopback_http(stuck_bmc.handle))
        scripted = {"gw-08": failing.url, "gw-09": stuck.url}
        inventory = _inventory(tmp / "inventory", hosts, management, sushy, scripted)

        wrong_key = generate_key_pair().private_text
        ledger = tmp / "ledger.sqlite3"
        released = management.directory / "released"
        environment = {
            "RESTORE_DATABASE_URL": f"sqlite:///{ledger}",
            "RESTORE_DATA_DIR": str(tmp / "data"),
            "RESTORE_DEPLOYMENT_URL": deploy.url,
            "RESTORE_DEPLOYMENT_TOKEN_SECRET": "deploy-token",
            "RESTORE_MANAGEMENT_HOST": "mgmt-01",
            "RESTORE_RELEASE_COMMAND": f"echo {{host}} >> {released}",
            "RESTORE_SECRET_SOURCES": "env",
            "RESTORE_LIVE_POLL_SECONDS": "0.2",
            "RESTORE_POWER_TIMEOUT_SECONDS": "25",
            "RESTORE_WOL_ADDRESS": "127.0.0.1",
            "RESTORE_WOL_PORT": str(deploy.wol_port),
            "RESTORE_WIPE_TIMEOUT_SECONDS": "60",
            "RESTORE_INSTALL_TIMEOUT_SECONDS": "60",
            "RESTORE_STAGE_ATTEMPTS": "2",
            env_variable("bmc-arl"): f"admin:{BMC_PASSWORD}",
            env_variable("bmc-wrong"): "admin:not-the-password",
            env_variable("ssh-client"): peers[0].client_key_text,
            env_variable("wrong-key"): wrong_key,
            env_variable("deploy-token"): DEPLOY_TOKEN,
        }
        yield LiveEstate(
            inventory,
            ledger,
            environment,
            hosts,
            management,
            sushy,
            peers[0].client_key_text,
            wrong_key,
            first_keys,
        )
