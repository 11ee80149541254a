"""Run stores: the protocol (`base`), the SQLite index next to the notebooks (`sqlite`, the
default) and PostgreSQL shared by replicas (`postgres`, when AUTOCODER_DATABASE_URL is set)."""

from __future__ import annotations

from autocoder.config import Settings
from autocoder.store.base import Store
from autocoder.store.postgres import PostgresStore
from autocoder.store.sqlite import SqliteStore

__all__ = ["PostgresStore", "SqliteStore", "Store", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store the settings name, not yet opened: PostgreSQL when AUTOCODER_DATABASE_URL is
    set (ConfigError if psycopg is missing), else SQLite next to the notebooks."""
    if settings.database_url is not None:
        return PostgresStore(settings)
    return SqliteStore(settings.notebooks_dir, settings.autofile_dir)
