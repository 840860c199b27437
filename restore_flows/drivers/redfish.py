"""Power, one-time boot and virtual media over Redfish (DMTF DSP0266), with a synchronous httpx client.

One :class:`RedfishPower` serves every host of a run: it keeps one HTTP client, one login and the
discovered system per BMC, and is safe to call from several threads (Prefect runs tasks in threads).
Every operation waits until the BMC shows the change, or raises.

Errors, all carrying host, stage and a detail that names the BMC and never a password::

    DriverError (restore_flows.drivers.base)
    ├── DriverTimeout         no answer in time, or the BMC never showed the change      retryable
    └── RedfishError          the BMC answered with an error status; .status, .messages
        ├── RedfishAccessError    401, 403: credentials or privileges                  not retryable
        ├── RedfishNotFound       404                                                  not retryable
        ├── RedfishConflict       409: the BMC is busy with another change             retryable
        └── RedfishServerError    5xx (but 501 Not Implemented)                         retryable
    (any other 4xx is a plain RedfishError, not retryable, except 429 Too Many Requests)

Connection failures become a plain retryable ``DriverError``; an untrusted TLS certificate a
non-retryable one. Both are chained ``from`` the httpx error.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import SecretStr

from restore_flows.drivers.base import BootDevice, DriverError, DriverTimeout, PowerState
from restore_flows.drivers.secrets import SecretNotFound, Secrets, split_credentials
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Bmc, Stage

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_ROOT: Final = "/redfish/v1/"
DEFAULT_SESSIONS: Final = "/redfish/v1/SessionService/Sessions"

# --- Vendor strings <-> internal values: the only place Redfish spellings appear ---

POWER_STATES: Final[Mapping[str, PowerState]] = {
    "On": PowerState.ON,
    "Off": PowerState.OFF,
    "PoweringOn": PowerState.POWERING_ON,
    "PoweringOff": PowerState.POWERING_OFF,
}
REDFISH_POWER_STATE: Final[Mapping[PowerState, str]] = {value: key for key, value in POWER_STATES.items()}

BOOT_TARGETS: Final[Mapping[BootDevice, str]] = {
    BootDevice.PXE: "Pxe",
    BootDevice.CD: "Cd",
    BootDevice.DISK: "Hdd",
}

# Virtual media devices that can carry a bootable ISO, as Redfish names their MediaTypes.
CD_MEDIA_TYPES: Final = frozenset({"CD", "DVD"})


class ResetType(StrEnum):
    """The ``ComputerSystem.Reset`` types this driver sends (values are Redfish's spellings)."""

    ON = "On"
    FORCE_OFF = "ForceOff"
    GRACEFUL_SHUTDOWN = "GracefulShutdown"
    FORCE_RESTART = "ForceRestart"


# --- Errors ---


class RedfishError(DriverError):
    def __init__(
        self,
        host: str,
        stage: Stage,
        detail: str,
        *,
        status: int,
        messages: Sequence[str] = (),
        retryable: bool = False,
    ) -> None:
        super().__init__(host, stage, detail, retryable=retryable)
        self.status = status
        self.messages = tuple(messages)


class RedfishAccessError(RedfishError):
    pass


class RedfishNotFound(RedfishError):
    pass


class RedfishConflict(RedfishError):
    pass


class RedfishServerError(RedfishError):
    pass


# status -> (error class, retryable); any other 4xx is a plain, non-retryable RedfishError.
STATUS_ERRORS: Final[Mapping[int, tuple[type[RedfishError], bool]]] = {
    401: (RedfishAccessError, False),
    403: (RedfishAccessError, False),
    404: (RedfishNotFound, False),
    409: (RedfishConflict, True),
    # 412: the resource changed between our read and our PATCH (its ETag no longer matches): read again.
    412: (RedfishConflict, True),
    429: (RedfishError, True),
    # 501: the BMC does not implement the request (e.g. a reset type); asking again will not help.
    501: (RedfishServerError, False),
}


def redfish_messages(response: httpx.Response) -> list[str]:
    """The readable messages of a Redfish error body (``error.@Message.ExtendedInfo[].Message``, else
    ``error.message``), or the start of the body when it is not a Redfish error."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return [text[:200]] if text else []
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return []
    messages: list[str] = []
    infos = error.get("@Message.ExtendedInfo")
    for info in infos if isinstance(infos, list) else []:
        if isinstance(info, dict) and isinstance(info.get("Message"), str):
            message_id = info.get("MessageId")
            suffix = f" ({message_id})" if isinstance(message_id, str) else ""
            messages.append(info["Message"] + suffix)
    if not messages and isinstance(error.get("message"), str):
        messages.append(error["message"])
    if not messages and isinstance(error.get("code"), str):
        messages.append(error["code"])
    return messages


def status_error(
    host: str,
    stage: Stage,
    where: str,
    response: httpx.Response,
    *,
    scrub: Callable[[str], str] = str,
    note: str = "",
) -> RedfishError:
    """The error for an HTTP error answer. ``where`` names the BMC and the request; ``scrub`` removes
    what the BMC must not echo into an error (a password); ``note`` is appended."""
    status = response.status_code
    fallback = (RedfishServerError, True) if status >= 500 else (RedfishError, False)
    error_class, retryable = STATUS_ERRORS.get(status, fallback)
    messages = [scrub(message) for message in redfish_messages(response)]
    said = f": {'; '.join(messages)}" if messages else ""
    detail = f"{where}: HTTP {status} {response.reason_phrase}{said}{note}"
    return error_class(host, stage, detail, status=status, messages=messages, retryable=retryable)


# --- HTTP client ---

DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)
"""BMCs are slow (several seconds per request is common) but must not hang a stage for ever."""


def default_client(bmc: Bmc) -> httpx.Client:
    """An httpx client for one BMC: certificate checked against the system store or ``bmc.ca_bundle``;
    unchecked only when the inventory says ``verify_tls: false``."""
    verify: ssl.SSLContext | bool
    if not bmc.verify_tls:
        verify = False
    elif bmc.ca_bundle:
        verify = ssl.create_default_context(cafile=bmc.ca_bundle)
    else:
        # The operating system's store, where a hospital installs its internal CA (httpx's own default
        # would be certifi's public CAs only).
        verify = ssl.create_default_context()
    # trust_env=False: a proxy or CA from the environment must not silently carry BMC credentials;
    # the inventory says how each BMC is reached.
    return httpx.Client(verify=verify, timeout=DEFAULT_TIMEOUT, trust_env=False)


def base_url(address: str) -> str:
    """``https://`` + a bare host name or IP; a URL is kept as written (``http://`` only for labs)."""
    url = address.strip()
    if "://" not in url:
        try:
            bare_v6 = ipaddress.ip_address(url).version == 6
        except ValueError:
            bare_v6 = False
        url = f"https://[{url}]" if bare_v6 else f"https://{url}"
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("it must not carry credentials: name a credentials_secret instead")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) address: {address!r}")
    return url.rstrip("/")


# --- The driver ---


@dataclass
class _Connection:
    """What the driver knows about one BMC: its client, its login and the system it drives."""

    bmc: Bmc
    url: str
    client: httpx.Client
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    session_uri: str | None = None
    sessions_url: str | None = None
    systems_url: str = "/redfish/v1/Systems"
    system_path: str | None = None
    reset_target: str | None = None
    reset_types: frozenset[str] = frozenset()
    cd_path: str | None = None
    login_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return f"BMC at {self.url}"

    def absolute(self, path: str) -> str:
        return path if "://" in path else self.url + path

    def scrub(self, text: str) -> str:
        """A BMC may echo what it was sent; a password must not reach an error or a log through it."""
        for secret in (self.password, self.token):
            value = secret.get_secret_value() if secret is not None else ""
            if value:
                text = text.replace(value, "**********")
        return text


class RedfishPower:
    """:class:`~restore_flows.drivers.base.PowerDriver` over Redfish. Use it as a context manager, or
    call :meth:`close` at the end of a run: that logs out of the BMCs and closes the clients."""

    def __init__(
        self,
        secrets: Secrets,
        *,
        client_factory: Callable[[Bmc], httpx.Client] = default_client,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_timeout: float = 30.0,
        poll_interval: float = 1.0,
        grace_timeout: float = 120.0,
        conflict_retries: int = 5,
        conflict_delay: float = 2.0,
        stage: Stage = Stage.REIMAGE,
    ) -> None:
        """``poll_timeout``: how long a change may take to show (BMCs report a power change seconds
        later; sushy-tools up to 11 s, and only when asked). ``grace_timeout``: how long the OS gets to
        shut down before the power is forced off. ``conflict_retries``: attempts at a reset the BMC
        answers with 409. ``stage``: the stage named in errors."""
        self.secrets = secrets
        self.client_factory = client_factory
        self.clock = clock
        self.sleep = sleep
        self.poll_timeout = poll_timeout
        self.poll_interval = poll_interval
        self.grace_timeout = grace_timeout
        self.conflict_retries = conflict_retries
        self.conflict_delay = conflict_delay
        self.stage = stage
        self._connections: dict[Bmc, _Connection] = {}
        self._retired: list[_Connection] = []
        self._connect_locks: dict[Bmc, threading.Lock] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RedfishPower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            connections = [*self._connections.values(), *self._retired]
            self._connections.clear()
            self._retired.clear()
        for conn in connections:
            self._logout(conn)
            conn.client.close()

    # --- PowerDriver ---

    def power_state(self, host: Host) -> PowerState:
        conn = self._connect(host)
        return self._read_power(host, conn)

    def power_on(self, host: Host) -> None:
        conn = self._connect(host)
        state = self._read_power(host, conn)
        if state is PowerState.ON:
            return
        if state is PowerState.POWERING_OFF:
            # A reset sent while the BMC is still powering off may be dropped: let it finish first.
            self._wait_power(host, conn, PowerState.OFF, self.poll_timeout)
        if state is not PowerState.POWERING_ON:
            self._reset(host, conn, ResetType.ON)
        self._wait_power(host, conn, PowerState.ON, self.poll_timeout)

    def power_off(self, host: Host) -> None:
        conn = self._connect(host)
        state = self._read_power(host, conn)
        if state is PowerState.OFF:
            return
        if state is PowerState.POWERING_OFF:
            self._wait_power(host, conn, PowerState.OFF, self.poll_timeout)
            return
        if ResetType.GRACEFUL_SHUTDOWN in self._reset_types(host, conn):
            try:
                self._reset(host, conn, ResetType.GRACEFUL_SHUTDOWN)
            except RedfishError as exc:
                if exc.status not in (400, 405, 501):
                    raise
                log.warning(
                    "%s: graceful shutdown refused (%s); forcing the power off", host.name, exc.detail
                )
            else:
                try:
                    self._wait_power(host, conn, PowerState.OFF, self.grace_timeout)
                except DriverTimeout:
                    log.warning(
                        "%s: still on %g s after a graceful shutdown; forcing the power off",
                        host.name,
                        self.grace_timeout,
                    )
                else:
                    return
        self._reset(host, conn, ResetType.FORCE_OFF)
        self._wait_power(host, conn, PowerState.OFF, self.poll_timeout)

    def power_cycle(self, host: Host) -> None:
        # Off then On rather than ForceRestart: a restart may never read Off (many BMCs report On
        # throughout), so seeing Off and then On is the only proof that the host really went down and
        # will take its one-time boot override. ForceRestart only where the BMC offers no ForceOff.
        conn = self._connect(host)
        state = self._read_power(host, conn)
        if state is PowerState.ON and ResetType.FORCE_OFF not in self._reset_types(host, conn):
            self._reset(host, conn, ResetType.FORCE_RESTART)
            self._wait_power(host, conn, PowerState.ON, self.poll_timeout)
            return
        if state is not PowerState.OFF:
            if state is not PowerState.POWERING_OFF:
                self._reset(host, conn, ResetType.FORCE_OFF)
            self._wait_power(host, conn, PowerState.OFF, self.poll_timeout)
        self._reset(host, conn, ResetType.ON)
        self._wait_power(host, conn, PowerState.ON, self.poll_timeout)

    def boot_once(self, host: Host, device: BootDevice) -> None:
        conn = self._connect(host)
        target = BOOT_TARGETS[device]
        system_path = self._system(host, conn)
        read = self._request(host, conn, "GET", system_path)
        boot = _object(_json_object(read, lambda: self._not_json(host, conn, system_path)).get("Boot"))
        allowed = boot.get("BootSourceOverrideTarget@Redfish.AllowableValues")
        if isinstance(allowed, list) and allowed and target not in allowed:
            raise DriverError(
                host.name,
                self.stage,
                f"{conn.label} cannot boot from {target} (it offers {', '.join(map(str, allowed))})",
                retryable=False,
            )
        patch = {"Boot": {"BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": "Once"}}
        # Some BMCs (HPE iLO among them) refuse a PATCH without the ETag of what was read (HTTP 428):
        # send it when the BMC gave one, so that a change made meanwhile is refused (412), not overwritten.
        etag = read.headers.get("ETag")
        headers = {"If-Match": etag} if etag else None
        self._request(host, conn, "PATCH", system_path, body=patch, headers=headers)
        boot = _object(self._get(host, conn, system_path).get("Boot"))
        if boot.get("BootSourceOverrideTarget") != target:
            raise DriverError(
                host.name,
                self.stage,
                f"{conn.label} accepted boot override {target} but reads back "
                f"{boot.get('BootSourceOverrideTarget')!r}",
            )
        enabled = boot.get("BootSourceOverrideEnabled")
        if enabled != "Once":
            # sushy-tools ignores BootSourceOverrideEnabled and always reads back "Continuous". A real
            # BMC that did so would boot from the override on every start, not once: worth a warning
            # for the operator, not a failure, since the target did take.
            log.warning("%s: %s reads back boot override %r, not 'Once'", host.name, conn.label, enabled)

    def insert_media(self, host: Host, image_url: str) -> None:
        conn = self._connect(host)
        path = self._cd(host, conn)
        device = self._get(host, conn, path)
        if device.get("Inserted") is True and device.get("Image") == image_url:
            return
        if device.get("Inserted") is True:
            self._eject(host, conn, path, device)
        action = _action_target(
            device, "#VirtualMedia.InsertMedia", path + "/Actions/VirtualMedia.InsertMedia"
        )
        self._request(
            host, conn, "POST", action, body={"Image": image_url, "Inserted": True, "WriteProtected": True}
        )
        self._poll(
            host,
            conn,
            f"media {_shown_url(image_url)} inserted",
            lambda: self._get(host, conn, path),
            lambda media: media.get("Inserted") is True and media.get("Image") == image_url,
            lambda media: f"Inserted={media.get('Inserted')!r}, Image={_shown_url(media.get('Image'))!r}",
            self.poll_timeout,
        )

    def eject_media(self, host: Host) -> None:
        conn = self._connect(host)
        path = self._cd(host, conn)
        device = self._get(host, conn, path)
        if device.get("Inserted") is True:
            self._eject(host, conn, path, device)

    # --- Power and media steps ---

    def _read_power(self, host: Host, conn: _Connection) -> PowerState:
        value = self._get(host, conn, self._system(host, conn)).get("PowerState")
        state = POWER_STATES.get(value) if isinstance(value, str) else None
        if state is None:
            raise DriverError(
                host.name,
                self.stage,
                f"{conn.label} reports an unknown power state {value!r}",
                retryable=False,
            )
        return state

    def _wait_power(self, host: Host, conn: _Connection, wanted: PowerState, timeout: float) -> None:
        self._poll(
            host,
            conn,
            f"power {REDFISH_POWER_STATE[wanted]}",
            lambda: self._read_power(host, conn),
            lambda state: state is wanted,
            lambda state: REDFISH_POWER_STATE[state],
            timeout,
        )

    def _reset_types(self, host: Host, conn: _Connection) -> frozenset[str]:
        self._reset_action(host, conn)
        return conn.reset_types

    def _reset_action(self, host: Host, conn: _Connection) -> str:
        """The reset action's target and (in ``conn.reset_types``) the types the system accepts: every
        type when it does not say. Read once per BMC: neither changes."""
        if conn.reset_target is not None:
            return conn.reset_target
        system_path = self._system(host, conn)
        system = self._get(host, conn, system_path)
        reset = _object(_object(system.get("Actions")).get("#ComputerSystem.Reset"))
        allowed = reset.get("ResetType@Redfish.AllowableValues")
        if isinstance(allowed, list) and allowed:
            conn.reset_types = frozenset(map(str, allowed))
        else:
            conn.reset_types = frozenset(ResetType)
        conn.reset_target = _action_target(
            system, "#ComputerSystem.Reset", system_path + "/Actions/ComputerSystem.Reset"
        )
        return conn.reset_target

    def _reset(self, host: Host, conn: _Connection, reset_type: ResetType) -> None:
        target = self._reset_action(host, conn)
        attempt = 1
        while True:
            try:
                self._request(host, conn, "POST", target, body={"ResetType": reset_type.value})
            except RedfishConflict as exc:
                # Some BMCs (e.g. Dell iDRAC) transiently reject a reset, the "On" type in particular,
                # with HTTP 409 while they finish a previous power change: ask again a few times.
                if attempt >= self.conflict_retries:
                    raise
                log.info(
                    "%s: reset %s refused (409), attempt %d: %s", host.name, reset_type, attempt, exc.detail
                )
                attempt += 1
                self.sleep(self.conflict_delay)
            else:
                log.info("%s: %s accepted reset %s", host.name, conn.label, reset_type.value)
                return

    def _cd(self, host: Host, conn: _Connection) -> str:
        """The virtual CD/DVD drive: under the system (Redfish 1.x, sushy-tools) or under its manager
        (older BMCs)."""
        if conn.cd_path is not None:
            return conn.cd_path
        system = self._get(host, conn, self._system(host, conn))
        collections: list[str] = []
        if (own := _link(system.get("VirtualMedia"))) is not None:
            collections.append(own)
        managers = _object(system.get("Links")).get("ManagedBy")
        for manager in managers if isinstance(managers, list) else []:
            if (manager_path := _link(manager)) is not None:
                media = _link(self._get(host, conn, manager_path).get("VirtualMedia"))
                if media is not None and media not in collections:
                    collections.append(media)
        for collection in collections:
            for member in _members(self._get(host, conn, collection)):
                types = self._get(host, conn, member).get("MediaTypes")
                if isinstance(types, list) and CD_MEDIA_TYPES.intersection(map(str, types)):
                    conn.cd_path = member
                    return member
        raise DriverError(
            host.name, self.stage, f"{conn.label} offers no virtual CD/DVD drive", retryable=False
        )

    def _eject(self, host: Host, conn: _Connection, path: str, device: Mapping[str, Any]) -> None:
        action = _action_target(device, "#VirtualMedia.EjectMedia", path + "/Actions/VirtualMedia.EjectMedia")
        self._request(host, conn, "POST", action, body={})
        self._poll(
            host,
            conn,
            "media ejected",
            lambda: self._get(host, conn, path),
            lambda media: media.get("Inserted") is not True,
            lambda media: f"Inserted={media.get('Inserted')!r}",
            self.poll_timeout,
        )

    def _poll(
        self,
        host: Host,
        conn: _Connection,
        what: str,
        read: Callable[[], T],
        done: Callable[[T], bool],
        show: Callable[[T], str],
        timeout: float,
    ) -> T:
        """Read until ``done``. A retryable error counts as "not yet": BMCs answer 503 or drop
        connections while they carry out a power change."""
        deadline = self.clock() + timeout
        last = "nothing"
        while True:
            try:
                value = read()
            except DriverError as exc:
                if not exc.retryable:
                    raise
                last = f"error: {exc.detail}"
            else:
                if done(value):
                    return value
                last = show(value)
            if self.clock() >= deadline:
                raise DriverTimeout(
                    host.name,
                    self.stage,
                    f"{conn.label} did not report {what} within {timeout:g} s (last: {last})",
                )
            self.sleep(self.poll_interval)

    # --- Connection, login, discovery ---

    def _connect(self, host: Host) -> _Connection:
        bmc = host.bmc
        if bmc is None:
            raise DriverError(
                host.name, self.stage, "the inventory gives no BMC for this host", retryable=False
            )
        with self._lock:
            conn = self._connections.get(bmc)
            if conn is not None:
                return conn
            lock = self._connect_locks.setdefault(bmc, threading.Lock())
        # One login per BMC even when several threads ask at once, without holding up other BMCs.
        with lock:
            with self._lock:
                conn = self._connections.get(bmc)
            if conn is not None:
                return conn
            conn = self._open(host, bmc)
            try:
                self._login(host, conn)
                self._system(host, conn)
            except BaseException:
                self._logout(conn)
                conn.client.close()
                raise
            with self._lock:
                self._connections[bmc] = conn
            return conn

    def _open(self, host: Host, bmc: Bmc) -> _Connection:
        try:
            url = base_url(bmc.address)
        except ValueError as exc:
            raise DriverError(host.name, self.stage, f"BMC address: {exc}", retryable=False) from exc
        user: str | None = None
        password: SecretStr | None = None
        if bmc.credentials_secret is not None:
            try:
                user, password = split_credentials(
                    bmc.credentials_secret, self.secrets.get(bmc.credentials_secret)
                )
            except SecretNotFound as exc:
                raise DriverError(host.name, self.stage, f"BMC credentials: {exc}", retryable=False) from exc
        try:
            client = self.client_factory(bmc)
        except (OSError, ssl.SSLError) as exc:
            # Only the CA bundle is read here: a path from the inventory, not a secret.
            raise DriverError(
                host.name,
                self.stage,
                f"BMC at {url}: CA bundle {bmc.ca_bundle!r} unusable: {exc}",
                retryable=False,
            ) from exc
        return _Connection(bmc=bmc, url=url, client=client, user=user, password=password)

    def _login(self, host: Host, conn: _Connection) -> None:
        """A Redfish session when the service offers one, HTTP basic otherwise.

        Sessions are what the standard expects and spare the BMC a password check per request (some
        rate-limit basic auth). sushy-tools has no SessionService and answers 404.
        """
        try:
            # The service root is readable without credentials (DSP0266); a few BMCs want them anyway.
            response = self._send(host, conn, "GET", SERVICE_ROOT, auth=False)
        except RedfishAccessError:
            response = self._send(host, conn, "GET", SERVICE_ROOT)
        root = _json_object(response, lambda: self._not_json(host, conn, SERVICE_ROOT))
        conn.systems_url = _link(root.get("Systems")) or conn.systems_url
        if conn.user is None:
            return
        sessions = _link(_object(root.get("Links")).get("Sessions"))
        if sessions is None and "SessionService" in root:
            sessions = DEFAULT_SESSIONS
        if sessions is None:
            log.debug("%s: %s offers no sessions; using HTTP basic auth", host.name, conn.label)
            return
        conn.sessions_url = sessions
        self._create_session(host, conn)

    def _create_session(self, host: Host, conn: _Connection) -> None:
        if conn.user is None or conn.password is None or conn.sessions_url is None:
            return
        credentials = {"UserName": conn.user, "Password": conn.password.get_secret_value()}
        try:
            response = self._send(host, conn, "POST", conn.sessions_url, body=credentials, auth=False)
        except RedfishError as exc:
            if exc.status not in (404, 405, 501):
                raise
            log.debug(
                "%s: %s: no session service (%d); using HTTP basic auth", host.name, conn.label, exc.status
            )
            conn.sessions_url = None
            return
        token = response.headers.get("X-Auth-Token")
        if not token:
            raise DriverError(
                host.name, self.stage, f"{conn.label} created a session but sent no X-Auth-Token"
            )
        conn.token = SecretStr(token)
        location = response.headers.get("Location") or _link(_json_object(response))
        conn.session_uri = urlsplit(location).path if location else None

    def _logout(self, conn: _Connection) -> None:
        """Close the session: BMCs hold only a few (often 8 to 16) and a leaked one blocks later runs."""
        if conn.token is None or conn.session_uri is None:
            return
        headers = {"X-Auth-Token": conn.token.get_secret_value()}
        conn.token = None
        try:
            conn.client.delete(conn.absolute(conn.session_uri), headers=headers)
        except httpx.HTTPError as exc:
            log.info("%s: could not close the Redfish session (%s)", conn.label, type(exc).__name__)
        conn.session_uri = None

    def _system(self, host: Host, conn: _Connection) -> str:
        """The system's path: the only member of the collection, or the one ``bmc.system_id`` names."""
        if conn.system_path is not None:
            return conn.system_path
        members = _members(self._get(host, conn, conn.systems_url))
        wanted = conn.bmc.system_id
        listed = ", ".join(members) or "none"
        if wanted is None:
            if len(members) != 1:
                raise DriverError(
                    host.name,
                    self.stage,
                    f"{conn.label} manages {len(members)} systems ({listed}): set bmc.system_id",
                    retryable=False,
                )
            conn.system_path = members[0]
            return conn.system_path
        for member in members:
            if member.rstrip("/").rsplit("/", 1)[-1] == wanted:
                conn.system_path = member
                return member
        # The id may be an alias: sushy-tools answers a system asked for by name with a 307 to its
        # UUID URL. The system's own @odata.id is then its canonical path.
        try:
            system = self._get(host, conn, f"{conn.systems_url.rstrip('/')}/{quote(wanted, safe='')}")
        except RedfishNotFound as exc:
            raise DriverError(
                host.name,
                self.stage,
                f"{conn.label} has no system {wanted!r} (it has {listed})",
                retryable=False,
            ) from exc
        path = _link(system)
        if path is None:
            raise DriverError(host.name, self.stage, f"{conn.label}: system {wanted!r} has no @odata.id")
        conn.system_path = path
        return path

    def _retire(self, conn: _Connection) -> None:
        """Stop using a BMC whose login was refused: the next call reads the secret again (an operator
        may have fixed it). Its client is closed at :meth:`close`, as another thread may still use it."""
        with self._lock:
            if self._connections.get(conn.bmc) is conn:
                del self._connections[conn.bmc]
                self._retired.append(conn)

    # --- HTTP ---

    def _get(self, host: Host, conn: _Connection, path: str) -> dict[str, Any]:
        return _json_object(self._request(host, conn, "GET", path), lambda: self._not_json(host, conn, path))

    def _request(
        self,
        host: Host,
        conn: _Connection,
        method: str,
        path: str,
        *,
        body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        used = conn.token
        try:
            return self._send(host, conn, method, path, body=body, extra=headers)
        except RedfishAccessError as exc:
            if exc.status != 401:  # 403: known, but not allowed; logging in again changes nothing
                raise
            if used is None:
                self._retire(conn)
                raise
        # Sessions expire after some idle minutes (often 30), and a restore wave can wait longer than
        # that between stages: log in again, once (and once for all threads that saw the same token).
        log.info("%s: %s refused the session; logging in again", host.name, conn.label)
        with conn.login_lock:
            if conn.token is used:
                conn.token = None
                conn.session_uri = None
                self._create_session(host, conn)
        try:
            return self._send(host, conn, method, path, body=body, extra=headers)
        except RedfishAccessError:
            self._retire(conn)
            raise

    def _send(
        self,
        host: Host,
        conn: _Connection,
        method: str,
        path: str,
        *,
        body: object = None,
        auth: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        headers = {"Accept": "application/json", "OData-Version": "4.0", **(extra or {})}
        content: bytes | None = None
        if body is not None:
            # sushy-tools answers 415 without this header, and so do strict BMCs.
            headers["Content-Type"] = "application/json"
            content = json.dumps(body).encode()
        basic: httpx.BasicAuth | None = None
        if auth and conn.token is not None:
            headers["X-Auth-Token"] = conn.token.get_secret_value()
        elif auth and conn.user is not None and conn.password is not None:
            basic = httpx.BasicAuth(conn.user, conn.password.get_secret_value())
        where = f"{conn.label}: {method} {path}"
        try:
            # Redirects: sushy-tools answers a system asked for by name with a 307 to its UUID URL.
            response = conn.client.request(
                method,
                conn.absolute(path),
                headers=headers,
                content=content,
                auth=basic,
                follow_redirects=True,
            )
        except httpx.TimeoutException as exc:
            raise DriverTimeout(
                host.name, self.stage, f"{where}: no answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise self._transport_error(host, conn, where, exc) from exc
        log.debug("%s: %s -> %d", host.name, where, response.status_code)
        if response.status_code < 400:
            return response
        note = ""
        if response.status_code in (401, 403) and conn.bmc.credentials_secret is not None:
            note = f" (credentials from secret {conn.bmc.credentials_secret!r})"
        raise status_error(host.name, self.stage, where, response, scrub=conn.scrub, note=note)

    def _transport_error(
        self, host: Host, conn: _Connection, where: str, exc: httpx.TransportError
    ) -> DriverError:
        verify_error = _cause(exc, ssl.SSLCertVerificationError)
        if verify_error is not None:
            reason = verify_error.verify_message or str(verify_error)
            given = (
                f"bmc.ca_bundle is {conn.bmc.ca_bundle!r}" if conn.bmc.ca_bundle else "no bmc.ca_bundle given"
            )
            return DriverError(
                host.name,
                self.stage,
                f"{where}: TLS certificate not trusted ({reason}; {given}): "
                "give the CA that signed the BMC's certificate as bmc.ca_bundle",
                retryable=False,
            )
        if _cause(exc, ssl.SSLError) is not None:
            return DriverError(
                host.name, self.stage, f"{where}: TLS handshake failed: {exc}", retryable=False
            )
        if isinstance(exc, httpx.UnsupportedProtocol):
            return DriverError(host.name, self.stage, f"{where}: {exc}", retryable=False)
        return DriverError(
            host.name, self.stage, f"{where}: cannot reach the BMC ({type(exc).__name__}: {exc})"
        )

    def _not_json(self, host: Host, conn: _Connection, path: str) -> DriverError:
        return DriverError(host.name, self.stage, f"{conn.label}: {path}: the answer is not a JSON object")


# --- JSON helpers: Redfish payloads are loosely typed; these keep the driver's reading of them total ---


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json_object(response: httpx.Response, error: Callable[[], Exception] | None = None) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if error is not None:
            raise error()
        return {}
    return body


def _link(value: object) -> str | None:
    link = _object(value).get("@odata.id")
    return link if isinstance(link, str) and link else None


def _members(collection: Mapping[str, Any]) -> list[str]:
    members = collection.get("Members")
    return [link for link in map(_link, members if isinstance(members, list) else []) if link is not None]


def _shown_url(url: object) -> object:
    """An image URL fit for a message: a deployment server's credentials in it are dropped."""
    if not isinstance(url, str):
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _action_target(resource: Mapping[str, Any], action: str, default: str) -> str:
    """The action's ``target`` as the resource advertises it (the standard way), else the usual path."""
    target = _object(_object(resource.get("Actions")).get(action)).get("target")
    return target if isinstance(target, str) and target else default


E = TypeVar("E", bound=BaseException)


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` in the chain of causes: httpx wraps httpcore, which wraps the ssl error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
