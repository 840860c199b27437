"""What keeps the product from calling out: it runs where the internet is gone, and must not try.

Prefect reaches for the internet in four places, each turned off here, wherever the project starts it:

- **SDK telemetry** starts at ``import prefect`` in every client (the CLI, ``serve()``, each flow run,
  a worker) and sends events to a third party unless ``DO_NOT_TRACK`` is set, or the server it talks to
  says analytics are off (a server the project did not start may say otherwise): ``CLIENT_ENV``, set by
  ``restore`` before Prefect is imported and inherited by every process it starts.
- **Server telemetry** (a heartbeat to Prefect's collector): ``PREFECT_SERVER_ANALYTICS_ENABLED=false``.
- **The collection registry**: the server fetches worker and block metadata from GitHub when a client
  asks for it (``prefect worker start`` for a new pool, the UI's work pool pages), and falls back to the
  copy in its wheel when that fails. No setting turns the fetch off, so the server gets a dead-end
  proxy: its outbound HTTP(S) goes to a closed port on loopback and fails at once, with no DNS lookup,
  while its own address is reached directly (``server_env``).
- **The new UI** bundles an analytics SDK that calls out from the browser whatever the settings say:
  the older UI (which calls nothing) is served instead (see ``flows/server.py``).

Left as they are, reached only by a person's click, and failing harmlessly offline: the API reference
page (``/docs``) loads Swagger UI from a CDN, the Blocks catalogue shows logos hosted on GitHub, and the
"join the community" form posts to a third party.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

CLIENT_ENV: Mapping[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

DEAD_END_PROXY = "http://127.0.0.1:9"
"""The discard port on loopback, where nothing listens: a request sent there is refused at once."""

_PROXY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def stay_offline(environ: MutableMapping[str, str] | None = None) -> None:
    """Turn off Prefect's telemetry for this process and every process it starts; before Prefect loads."""
    (os.environ if environ is None else environ).update(CLIENT_ENV)


def server_env(host: str) -> dict[str, str]:
    """Environment for ``prefect server start``: no telemetry, and outbound requests to a dead end.

    Both spellings of each proxy variable: Python's lookup lets the lower-case one win, and a machine
    may have a real proxy configured in either.
    """
    env = {**CLIENT_ENV}
    for name in _PROXY_NAMES:
        env[name] = env[name.lower()] = DEAD_END_PROXY
    direct = ",".join(dict.fromkeys(["localhost", "127.0.0.1", "::1", host]))
    env["NO_PROXY"] = env["no_proxy"] = direct
    return env
