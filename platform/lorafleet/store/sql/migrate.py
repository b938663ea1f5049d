"""Run the Alembic migrations in ``migrations/`` programmatically (``lorafleet db upgrade`` and tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from lorafleet.config import Settings, load_settings
from lorafleet.errors import ConfigError
from lorafleet.store.sql.database import create_db_engine

#: platform/lorafleet/store/sql/migrate.py -> repository root
_REPO_ROOT = Path(__file__).resolve().parents[4]


def migrations_dir(settings: Settings | None = None) -> Path:
    """Where the migration scripts are: the ``migrations_dir`` setting (``LORAFLEET_MIGRATIONS_DIR``) or the
    checkout's ``migrations/``; ``settings`` default to the environment's."""
    configured = (settings or load_settings()).migrations_dir
    path = _REPO_ROOT / "migrations" if configured is None else configured
    if not (path / "env.py").is_file():
        raise ConfigError(f"LORAFLEET_MIGRATIONS_DIR: no Alembic environment at {path}")
    return path


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Take the database at ``url`` down to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
