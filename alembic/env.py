"""Alembic environment: the models' metadata, and the URL from the project's settings.

``restore db upgrade`` passes an open connection in ``config.attributes``; the plain ``alembic`` command
(run from the repository root with ``alembic.ini``) builds one from ``RESTORE_DATABASE_URL`` / the
default SQLite file.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import Connection

from restore_flows.ledger.db import make_engine
from restore_flows.ledger.tables import Base, UtcDateTime
from restore_flows.settings import Settings

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Write the UTC decorator as the plain column type it stores, so revisions import no project code."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=_render_item,
        # SQLite cannot ALTER most things: batch mode rebuilds tables where needed.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(Settings().ledger_url())
    with engine.connect() as new_connection:
        _run(new_connection)
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=Settings().ledger_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
