"""Air-gapped for real: the wheelhouse installs and the product runs where only loopback exists.

The wheelhouse is built here (the one step that needs the package index), then everything else runs in
a network namespace of this test's own with nothing but loopback and a sink: an interface that every
non-loopback address routes to, and that leads nowhere. A fresh virtual environment is
made there with this machine's Python 3.11 and filled by ``install-offline``; then ``restore init``,
``validate``, ``db upgrade``, a rehearsal of the core wave through its own Prefect server, and
``restore up``: its UI and live view are searched for links off the machine, a served run of the icu
wave runs in a process of its own, and its server is asked for what it would otherwise fetch from the
internet.

Any attempt to reach another address, a DNS lookup included (the namespace's resolver sits behind the
sink), is a packet counted by the sink: the test fails unless the count stays at zero. The detector is
tested first: a deliberate connection and a lookup must show up in it. The outputs and logs are also
searched for connection errors, for attempts that failed before sending anything. The commands run
with a clean environment: no CI variables (Prefect turns its telemetry off by itself in CI, which would
hide a missing setting), no pip configuration, a home of their own.

The dependencies in the wheelhouse are kept between runs (in ``.cache/wheelhouse``, or
``RESTORE_TEST_WHEELHOUSE``), and downloaded again when uv.lock changes; the project's wheel is always
built afresh.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers.sshd import require_peers

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(os.environ.get("RESTORE_TEST_WHEELHOUSE", ROOT / ".cache" / "wheelhouse"))

# An address of TEST-NET-1 (RFC 5737), for documentation only: never routed anywhere. In the namespace
# it leads into the sink like any other non-loopback address.
UNROUTED_RESOLVER = "192.0.2.53"
CONNECTION_ERRORS = re.compile(
    r"Network is unreachable|Name or service not known|Temporary failure in name resolution|"
    r"getaddrinfo|ConnectError|ConnectTimeout|No route to host|Connection refused|"
    r"nodename nor servname|sens-o-matic|amplitude\.com|raw\.githubusercontent",
    re.IGNORECASE,
)

pytestmark = pytest.mark.slow

# Run inside the namespace: one line per packet sent into the sink, to say what was tried when the
# count is not zero (a name looked up, or an address and port).
SNIFFER = r"""
import socket, struct, sys
sink = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sink.bind(("sink0", 0))
out = open(sys.argv[1], "a", buffering=1)
print("ready", flush=True)
while True:
    frame, (_, _, kind, _, _) = sink.recvfrom(65535)
    if kind != socket.PACKET_OUTGOING:
        continue
    if frame[12:14] != b"\x08\x00":
        out.write("non-IPv4 frame\n")
        continue
    ip = frame[14:]
    header = (ip[0] & 15) * 4
    proto, dst = ip[9], socket.inet_ntoa(ip[16:20])
    port = struct.unpack("!H", ip[header + 2 : header + 4])[0] if proto in (6, 17) else 0
    what = f"{'tcp' if proto == 6 else 'udp' if proto == 17 else proto} {dst}:{port}"
    if proto == 17 and port == 53:
        labels, at = [], header + 8 + 12
        while at < len(ip) and ip[at]:
            labels.append(ip[at + 1 : at + 1 + ip[at]].decode(errors="replace"))
            at += 1 + ip[at]
        what += " DNS query for " + ".".join(labels)
    out.write(what + "\n")
"""


@dataclass
class Namespace:
    name: str
    seen: Path
    """What the sniffer saw sent into the sink, one packet a line."""
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        timeout: float,
        log: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if log is not None:
            log.write_text(f"$ {' '.join(args)}\n{done.stdout}\n--- stderr\n{done.stderr}")
        return done

    def sent(self) -> int:
        """Packets the sink was given: every attempt to reach something other than loopback."""
        answer = subprocess.run(
            ["ip", "netns", "exec", self.name, "cat", "/sys/class/net/sink0/statistics/tx_packets"],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(answer.stdout)

    def tried(self) -> str:
        return self.seen.read_text() if self.seen.exists() else ""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)


@pytest.fixture
def namespace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    if os.geteuid() != 0:
        require_peers("network namespaces need root")
    name = f"restore-offline-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        require_peers(f"cannot make a network namespace: {made.stderr.strip()}")
    resolver = Path("/etc/netns") / name
    try:
        # 'ip netns exec' puts the files of /etc/netns/NAME over /etc: the namespace's own resolver.
        resolver.mkdir(parents=True)
        (resolver / "resolv.conf").write_text(
            f"nameserver {UNROUTED_RESOLVER}\noptions timeout:1 attempts:1\n"
        )
        for command in (
            ["ip", "link", "set", "lo", "up"],
            # The sink: a veth pair whose far end has no address and forwards nothing, so what is
            # sent into it is counted and dropped. No IPv6 on it (its neighbour discovery would be
            # counted as traffic), no ARP (an attempt is a packet, not a query).
            ["ip", "link", "add", "sink0", "type", "veth", "peer", "name", "sink1"],
            ["sysctl", "-q", "-w", "net.ipv6.conf.sink0.disable_ipv6=1"],
            ["sysctl", "-q", "-w", "net.ipv6.conf.sink1.disable_ipv6=1"],
            ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"],
            ["ip", "link", "set", "sink0", "arp", "off"],
            ["ip", "link", "set", "sink1", "up"],
            ["ip", "link", "set", "sink0", "up"],
            ["ip", "route", "add", "default", "dev", "sink0"],
        ):
            step = _ip("netns", "exec", name, *command)
            assert step.returncode == 0, f"{command}: {step.stderr}"
        seen = tmp_path_factory.mktemp("sink") / "sent.txt"
        with subprocess.Popen(
            ["ip", "netns", "exec", name, _python311(), "-c", SNIFFER, str(seen)],
            stdout=subprocess.PIPE,
            text=True,
        ) as sniffer:
            try:
                assert sniffer.stdout is not None
                assert sniffer.stdout.readline().strip() == "ready", "the sink's sniffer did not start"
                yield Namespace(name, seen)
            finally:
                sniffer.kill()
    finally:
        _ip("netns", "delete", name)
        for leftover in resolver.glob("*"):
            leftover.unlink()
        if resolver.exists():
            resolver.rmdir()


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What a fresh shell on the target would have: no CI flags, no pip or Prefect settings."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": str(home),
        **extra,
    }


def _python311() -> str:
    """This machine's CPython 3.11 itself (not a virtual environment's, not a version manager's shim),
    the interpreter the wheelhouse is built for."""
    for candidate in (Path(sys.base_prefix) / "bin" / "python3.11", Path("/usr/bin/python3.11")):
        if candidate.exists():
            return str(candidate)
    require_peers("no CPython 3.11 on this machine: the wheelhouse is built for it")
    raise AssertionError("unreachable")


def test_the_detector_sees_an_attempt_to_leave(namespace: Namespace, tmp_path: Path) -> None:
    """A connection to an unrouted address and a name lookup both reach the sink: zero means zero."""
    before = namespace.sent()
    probe = (
        "import socket\n"
        "for target in [('192.0.2.1', 443), ('pypi.org', 443)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=1).close()\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    probed = namespace.run(
        [_python311(), "-c", probe], env=_clean_env(tmp_path / "home"), cwd=tmp_path, timeout=30
    )
    assert probed.returncode == 0, probed.stderr
    assert probed.stdout.count("\n") == 2, probed.stdout  # both failed: nothing there answers
    assert namespace.sent() >= before + 2  # a SYN, and at least one DNS query
    tried = namespace.tried()
    assert "tcp 192.0.2.1:443" in tried, tried
    assert f"udp {UNROUTED_RESOLVER}:53 DNS query for pypi.org" in tried, tried


def _assert_no_connection_errors(logs: list[Path]) -> None:
    found = []
    for log in logs:
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            if CONNECTION_ERRORS.search(line):
                found.append(f"{log.name}:{number}: {line.strip()[:300]}")
    assert not found, "connection errors in the logs:\n" + "\n".join(found)


@pytest.mark.timeout(1200)
def test_installed_offline_it_validates_migrates_and_rehearses_the_core_wave(
    namespace: Namespace, tmp_path: Path
) -> None:
    timings = namespace.timings
    logs = tmp_path / "logs"
    logs.mkdir()

    started = time.monotonic()
    build = subprocess.run(
        [str(ROOT / "scripts" / "wheelhouse"), str(WHEELHOUSE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    timings["wheelhouse"] = time.monotonic() - started
    assert build.returncode == 0, build.stderr[-4000:]
    assert (WHEELHOUSE / "requirements.txt").is_file()
    wheels = list(WHEELHOUSE.glob("*.whl"))
    assert any(w.name.startswith("restore_orchestrator-") for w in wheels)
    assert all("win" not in w.name and "macosx" not in w.name for w in wheels), wheels
    assert not [w.name for w in wheels if w.name.split("-")[0] in ("pytest", "mypy", "ruff", "hypothesis")]

    baseline = namespace.sent()
    home = tmp_path / "home"
    env = _clean_env(home, PYTHON=_python311())
    venv = tmp_path / "venv"
    started = time.monotonic()
    install = namespace.run(
        [str(WHEELHOUSE / "install-offline"), str(WHEELHOUSE), str(venv)],
        env=env,
        cwd=tmp_path,
        timeout=600,
        log=logs / "install.log",
    )
    timings["install"] = time.monotonic() - started
    assert install.returncode == 0, install.stdout + install.stderr
    assert "restore init" in install.stdout
    restore = str(venv / "bin" / "restore")

    site = tmp_path / "site"
    site.mkdir()
    for args, expected in (
        (["init"], "inventory"),
        (["validate"], "inventory OK"),
        (["db", "upgrade"], "(empty) ->"),
    ):
        done = namespace.run([restore, *args], env=env, cwd=site, timeout=120, log=logs / f"{args[-1]}.log")
        assert done.returncode == 0, done.stdout + done.stderr
        assert expected in done.stdout, done.stdout

    started = time.monotonic()
    rehearsal = namespace.run(
        [restore, "rehearse", "--wave", "core"], env=env, cwd=site, timeout=600, log=logs / "rehearse.log"
    )
    timings["rehearsal"] = time.monotonic() - started
    assert rehearsal.returncode == 0, rehearsal.stdout[-4000:] + rehearsal.stderr[-4000:]
    assert "Prefect server ready on 127.0.0.1:4200" in rehearsal.stdout, rehearsal.stdout
    assert "Completed" in rehearsal.stdout, rehearsal.stdout

    # The served UI and what the server fetches from the internet when a client asks for it (a new
    # worker's pool, the UI's work pool pages): answered from its own copy, nothing sent out.
    started = time.monotonic()
    served = _serve_and_probe(namespace, restore, env, site, logs)
    timings["up"] = time.monotonic() - started
    assert served.returncode == 0, served.stdout + served.stderr
    worker_types = re.search(r"worker types: (.*)", served.stdout)
    assert worker_types is not None, served.stdout
    assert "process" in worker_types.group(1).split(", "), served.stdout
    assert "external in page: none" in served.stdout, served.stdout
    served_run = re.search(r"served run: (.*)", served.stdout)
    assert served_run is not None, served.stdout
    assert served_run.group(1).startswith("COMPLETED"), served.stdout
    assert "nothing to do" not in served_run.group(1), served.stdout

    assert namespace.sent() == baseline, (
        f"{namespace.sent() - baseline} packets left for a non-loopback address:\n{namespace.tried()}"
    )
    _assert_no_connection_errors([*logs.glob("*.log"), *site.rglob("*.log")])
    print(  # the figures for the record (pytest -s shows them)
        "\nair-gapped timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
        file=sys.stderr,
    )


PROBE = r"""
import re, sys, time, httpx
base = sys.argv[1]
deadline = time.monotonic() + 180
while True:
    try:
        if httpx.get(base + "/api/health", timeout=2).json() is True:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the server of 'restore up' never became healthy")
    time.sleep(0.5)
wave_url = base + "/api/deployments/name/restore-wave/restore-wave"
while (found := httpx.get(wave_url, timeout=30)).status_code == 404:
    if time.monotonic() > deadline:
        sys.exit("'restore up' never served restore-wave")
    time.sleep(0.5)
found.raise_for_status()
wave = found.json()
view = httpx.get(base + "/api/collections/views/aggregate-worker-metadata", timeout=60)
view.raise_for_status()
print("worker types:", ", ".join(sorted(view.json().get("prefect", {}))))
# A flow run as ops start it from the UI (served, so in a process of its own): the next wave, which
# the core wave's rehearsal left to do.
# A busy server (SQLite, a run recording its task runs) may answer 503 or late: ask again, as the UI
# would; any other refusal is shown as it is.
made = None
for _ in range(20):
    try:
        made = httpx.post(
            base + f"/api/deployments/{wave['id']}/create_flow_run",
            json={"parameters": {"params": {"wave": "icu"}}},
            timeout=30,
        )
    except httpx.TimeoutException:
        continue
    if made.status_code < 500:
        break
    time.sleep(1)
if made is None:
    sys.exit("creating the served run: the server never answered")
if made.status_code >= 300:
    sys.exit(f"creating the served run: HTTP {made.status_code}: {made.text[:2000]}")
run = made.json()
deadline = time.monotonic() + 400
state = {"type": "NOT READ", "message": "the server never answered"}
while time.monotonic() < deadline:
    try:  # a loaded server (a run of 145 hosts recording its task runs) may answer late
        state = httpx.get(base + f"/api/flow_runs/{run['id']}", timeout=30).json()["state"]
    except httpx.TimeoutException:
        continue
    if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        break
    time.sleep(0.5)
print("served run:", state["type"], state.get("message"))
external = []
for page_url in sys.argv[1:]:  # the Prefect UI, the managers' live view
    page = httpx.get(page_url + "/", timeout=30)
    page.raise_for_status()
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    external += [link for link in linked if re.match(r"(https?:)?//", link)]
    for sheet in [link for link in linked if link.endswith(".css") and link not in external]:
        css = httpx.get(str(page.url.join(sheet)), timeout=30).text
        external += re.findall(r'url\(\s*["\x27]?((?:https?:)?//[^)"\x27]+)', css)
print("external in page:", ", ".join(external) or "none")
"""


def _serve_and_probe(
    namespace: Namespace, restore: str, env: dict[str, str], site: Path, logs: Path
) -> subprocess.CompletedProcess[str]:
    """``restore up`` in the namespace, probed from inside it, then stopped as a service manager would."""
    with open(logs / "up.log", "w") as log:
        up = subprocess.Popen(
            ["ip", "netns", "exec", namespace.name, restore, "up"],
            env=env,
            cwd=site,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        python = str(Path(restore).with_name("python"))
        return namespace.run(
            [python, "-c", PROBE, "http://127.0.0.1:4200", "http://127.0.0.1:4201"],
            env=env,
            cwd=site,
            timeout=600,
            log=logs / "probe.log",
        )
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
