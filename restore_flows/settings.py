"""One settings object, read from the environment (prefix ``RESTORE_``) once and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_HOSTS = 250_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESTORE_", extra="ignore")

    data_dir: Path = Field(
        default=Path("data"),
        description="Local data directory: the embedded SQLite ledger lives here.",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the ledger database. Default: SQLite file 'ledger.sqlite3' in "
            "data_dir. Production: postgresql+psycopg://user@host/dbname (never Prefect's database)."
        ),
    )
    rehearsal_database_url: str | None = Field(
        default=None,
        description=(
            "Ledger of rehearsals, kept apart so that a rehearsal never marks a real host online. "
            "Default: SQLite file 'rehearsal.sqlite3' in data_dir."
        ),
    )
    inventory: Path = Field(default=Path("inventory"), description="Inventory directory (RESTORE_INVENTORY).")
    max_hosts: int = Field(
        default=DEFAULT_MAX_HOSTS,
        ge=1,
        le=10_000_000,
        description=(
            "Most hosts an inventory may hold once its ranges are expanded: a range with an extra digit "
            "is refused before it costs minutes and gigabytes."
        ),
    )
    prefect_host: str = Field(default="127.0.0.1", description="Address the local Prefect server binds.")
    prefect_port: int = Field(default=4200, ge=1, le=65535, description="Port of the local Prefect server.")
    dashboard_port: int = Field(
        default=4201, ge=1, le=65535, description="Port of the managers' dashboard that 'restore up' serves."
    )
    prefect_database_url: str | None = Field(
        default=None,
        description="Prefect server's own database (postgresql+asyncpg://...); default SQLite in its home.",
    )
    lease_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a run holds a host without renewing; after that another run may take over.",
    )
    heartbeat_seconds: float = Field(
        default=5.0, gt=0, le=3600, description="How often a run tells the ledger it is alive."
    )
    run_stale_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description=(
            "A run silent for this long is dead: the next run that wants one of its hosts takes it "
            "over at once (a new fencing token refuses the dead run's late writes)."
        ),
    )
    stage_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per stage, when its error may be transient, before an operator.",
    )
    sqlite_busy_timeout_ms: int = Field(
        default=30_000, ge=0, description="How long a SQLite writer waits for the lock."
    )

    # -- live mode: the real fleet -------------------------------------------------------------------
    deployment_url: str | None = Field(
        default=None, description="Base URL of the deployment server (PXE/imaging) for live runs."
    )
    deployment_ca_bundle: str | None = Field(
        default=None, description="CA bundle for the deployment server's TLS (default: the system's)."
    )
    deployment_token_secret: str | None = Field(
        default=None, description="Name of the secret holding the deployment server's API token."
    )
    management_host: str | None = Field(
        default=None, description="Inventory host that runs backup restores and network releases."
    )
    backup_command: str | None = Field(
        default=None,
        description="Template run on the management host to restore a VM ({host}, {address}, {mac}).",
    )
    release_command: str | None = Field(
        default=None,
        description="Template run on the management host to move a host to production ({host}, {address}).",
    )
    backup_url: str | None = Field(
        default=None,
        description="URL template POSTed to restore a VM (drivers.backup: http): {host}, {address}.",
    )
    release_url: str | None = Field(
        default=None,
        description="URL template POSTed to release a host (drivers.network: http): {host}, {address}.",
    )
    integrations_ca_bundle: str | None = Field(
        default=None, description="CA bundle for the backup and network APIs' TLS (default: the system's)."
    )
    integrations_token_secret: str | None = Field(
        default=None,
        description="Name of the secret holding the bearer token of the backup and network APIs.",
    )
    secret_sources: str = Field(
        default="env,prefect",
        description="Secret sources in order: 'env' (RESTORE_SECRET_<NAME>), 'prefect' (Secret blocks).",
    )
    live_poll_seconds: float = Field(default=10.0, gt=0, description="How often live waits ask again.")
    wipe_timeout_seconds: float = Field(default=3600.0, gt=0, description="Longest wait for a wipe.")
    install_timeout_seconds: float = Field(default=7200.0, gt=0, description="Longest wait for an install.")
    power_timeout_seconds: float = Field(
        default=120.0, gt=0, description="Longest wait for a BMC to show a power or boot change."
    )
    wol_address: str = Field(
        default="255.255.255.255",
        description="Where Wake-on-LAN packets go: the quarantine VLAN's broadcast address.",
    )
    wol_port: int = Field(default=9, ge=1, le=65535, description="UDP port of Wake-on-LAN packets.")
    ssh_max_sessions: int = Field(
        default=64, ge=1, description="Concurrent SSH commands, all hosts together."
    )
    worker_poll_seconds: float = Field(
        default=5.0, gt=0, le=300, description="How often a site's worker asks its queue for stages."
    )
    site_silent_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "A site whose queue no worker asked for this long has no worker: its hosts wait, and a "
            "stage its worker was running is run again once one is back. Well above the poll."
        ),
    )
    site_session_threads: int = Field(
        default=16,
        ge=1,
        le=512,
        description="Stages a site's session runs at once (each waits on its BMC or SSH, not on the CPU).",
    )
    site_session_patience_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "How long a site's session waits for a campaign the ledger no longer hears from (its "
            "process starved of CPU or restarting) before it ends; a campaign that ended ends it at once."
        ),
    )
    site_session_pool: int = Field(
        default=2,
        ge=1,
        le=100,
        description=(
            "Ledger connections of a site's session, its stages sharing them: every site's session "
            "holds some of PostgreSQL's connections, 100 by default for all of them."
        ),
    )

    def ledger_url(self, rehearsal: bool = False) -> str:
        if rehearsal:
            return self.rehearsal_database_url or f"sqlite:///{self.data_dir / 'rehearsal.sqlite3'}"
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'ledger.sqlite3'}"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def ui_url(self) -> str:
        return f"http://{self.prefect_host}:{self.prefect_port}"

    def dashboard_url(self, rehearsal: bool) -> str:
        return (
            f"http://{self.prefect_host}:{self.dashboard_port}/?ledger={'rehearsal' if rehearsal else 'live'}"
        )
