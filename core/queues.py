"""Which queue `--queue` or `$SDJOBS_QUEUE` names: a SQLite file (the default) or a PostgreSQL URL.

A `postgresql://` (or `postgres://`) URL opens the PostgreSQL store of the
`sdjobs[postgres]` extra (`sdjobs.postgres_store`), shared by workers on many
machines; anything else is a path to the SQLite queue file of one machine
(`sdjobs.sqlite_store`).  Both keep the same `Store` contract.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sdjobs.postgres_store import SCHEMA_VERSION as POSTGRES_SCHEMA
from sdjobs.postgres_store import PostgresStore, is_postgres_url, migrate, redact
from sdjobs.sqlite_store import QUEUE_ENV, SQLiteStore, queue_path
from sdjobs.sqlite_store import SCHEMA_VERSION as SQLITE_SCHEMA
from sdjobs.store import Store


def queue_location(option: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """`option` (`--queue`), else `$SDJOBS_QUEUE`, else the default queue file."""
    if option is None and is_postgres_url(environ.get(QUEUE_ENV)):
        return environ[QUEUE_ENV]
    return option if is_postgres_url(option) else str(queue_path(option, environ))


def open_store(option: str | None = None, environ: Mapping[str, str] = os.environ, *, lease: float | None = None) -> Store:
    """The queue `--queue` / `$SDJOBS_QUEUE` names; one that cannot be used is a `StoreError`.

    ``lease``: seconds without a heartbeat after which a worker counts as gone
    (None: the backend's default, 60 s for a file, 30 s for PostgreSQL).
    """
    location = queue_location(option, environ)
    backend = PostgresStore if is_postgres_url(location) else SQLiteStore
    return backend(location) if lease is None else backend(location, lease=lease)


def migrate_queue(option: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """Make or update the queue's schema (`sdjobs queue migrate`); returns a line saying what was done.

    A SQLite file is migrated whenever it is opened, so this only opens it; a
    PostgreSQL database gets sdjobs' tables and Procrastinate's (`postgres_store.migrate`).
    """
    location = queue_location(option, environ)
    if is_postgres_url(location):
        found = migrate(location)
        done = "up to date" if found == POSTGRES_SCHEMA else "made" if found == 0 else f"migrated from schema {found}"
        return f"{redact(location)}: sdjobs queue schema {POSTGRES_SCHEMA} ({done}), with Procrastinate's tables"
    with SQLiteStore(location) as store:
        return f"{store.location}: sdjobs queue schema {SQLITE_SCHEMA} (up to date)"
