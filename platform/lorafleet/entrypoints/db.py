"""``lorafleet db upgrade|downgrade|current``: the database schema (Alembic migrations in ``migrations/``).

They work on the database the ``LORAFLEET_*`` settings name and print the revision it is at afterwards.
"""

from __future__ import annotations

import argparse

from lorafleet.config import load_settings
from lorafleet.store.sql import migrate


def db_upgrade(args: argparse.Namespace) -> int:
    """Migrate up to ``args.revision`` (``head``: the newest) and print the revision reached."""
    url = load_settings().resolved_database_url
    migrate.upgrade(url, args.revision)
    return _print_revision(url)


def db_downgrade(args: argparse.Namespace) -> int:
    """Migrate down to ``args.revision`` (``base`` drops everything) and print the revision reached."""
    url = load_settings().resolved_database_url
    migrate.downgrade(url, args.revision)
    return _print_revision(url)


def db_current(_args: argparse.Namespace) -> int:
    """Print the database's revision, or ``(empty database)`` before the first migration."""
    print(migrate.current_revision(load_settings().resolved_database_url) or "(empty database)")
    return 0


def _print_revision(url: str) -> int:
    print(f"database at revision {migrate.current_revision(url)}")
    return 0
