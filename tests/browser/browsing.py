"""What the browser tests share: the system's Chromium, a record of every request, screenshots.

Playwright's own browser download is not available where the project is built and tested, so the
tests drive Debian's ``chromium`` package (``RESTORE_TEST_CHROMIUM`` names another binary). Without
it the tests skip with the reason, except where ``RESTORE_TEST_PEERS_REQUIRED=1`` (CI): there they fail.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, WebSocket

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
"""Where the browser tests leave their screenshots (git-ignored; CI keeps the folder as artifacts)."""

LOCAL_SCHEMES = frozenset({"data", "blob", "about", "file"})
"""Schemes that never reach a network."""


def chromium_path() -> str:
    """The Chromium to drive; skips (or fails, in CI) when there is none."""
    wanted = os.environ.get("RESTORE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if os.access(wanted, os.X_OK):
        return wanted
    reason = f"no Chromium at {wanted} (Debian: apt-get install chromium; or set RESTORE_TEST_CHROMIUM)"
    if os.environ.get("RESTORE_TEST_PEERS_REQUIRED") == "1":
        pytest.fail(f"RESTORE_TEST_PEERS_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def origin(url: str) -> str:
    """What a request is counted under: ``scheme://host:port``, or the scheme alone for local ones."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return f"{parts.scheme}:"
    return f"{parts.scheme}://{parts.netloc}"


def stays_local(url: str) -> bool:
    """Whether a request stays on this machine: loopback over HTTP(S)/WebSocket, or no network at all."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    if parts.scheme not in ("http", "https", "ws", "wss"):
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RequestLog:
    """Every request (and WebSocket) of the browser contexts it watches, counted per origin.

    Requests that would leave loopback are recorded, then refused before they go out: the test
    fails on them, and nothing reaches the network meanwhile."""

    counts: Counter[str] = field(default_factory=Counter)
    outside: list[str] = field(default_factory=list)

    def watch(self, context: BrowserContext) -> None:
        context.on("request", lambda request: self._seen(request.url))
        context.on("page", self._watch_page)
        context.route(lambda url: not stays_local(url), lambda route: route.abort("blockedbyclient"))

    def _watch_page(self, page: Page) -> None:
        page.on("websocket", self._seen_socket)

    def _seen_socket(self, socket: WebSocket) -> None:
        self._seen(socket.url)

    def _seen(self, url: str) -> None:
        self.counts[origin(url)] += 1
        if not stays_local(url):
            self.outside.append(url)

    def table(self) -> str:
        width = max((len(o) for o in self.counts), default=10)
        lines = [f"{'origin':<{width}}  requests"]
        lines += [f"{o:<{width}}  {n:>8}" for o, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        lines.append(f"{'total':<{width}}  {sum(self.counts.values()):>8}")
        return "\n".join(lines)


class Screenshots:
    """Numbered PNG files, one per step, in :data:`SCREENSHOTS` under a prefix of the test's own."""

    def __init__(self, prefix: str, folder: Path = SCREENSHOTS) -> None:
        self.folder = folder
        self.prefix = prefix
        self.taken: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{prefix}-*.png"):
            stale.unlink()

    def take(self, page: Page, step: str, *, full_page: bool = False) -> Path:
        path = self.folder / f"{self.prefix}-{len(self.taken) + 1:02d}-{step}.png"
        # Animations off: a dialog is shot as it stands, not half faded in.
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        self.taken.append(path)
        return path
