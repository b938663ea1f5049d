"""Helpers for the CLI tests: the platform over settings from the environment, as the CLI reads them, and a user's
``personal`` adapter with one registered version of random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.unit.registry.registry_helpers import write_adapter_dir

from lorafleet.domain import AdapterVersion
from lorafleet.platform import Platform


def platform_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Platform:
    """Set the CLI's settings in the environment (a data dir and a local blob directory under ``tmp_path``, and
    ``database_url``) and return the platform over them (the caller closes it)."""
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORAFLEET_DATABASE_URL", database_url)
    monkeypatch.setenv("LORAFLEET_OBJECT_STORE_URL", (tmp_path / "blobs").as_uri())
    return Platform.from_settings()


def personal_version(
    platform: Platform, *, tenant_id: int, user: str, folder: Path, seed: int, **register: Any
) -> AdapterVersion:
    """Version 1 of ``user``'s new ``personal`` adapter (the user made if absent): random weights written to
    ``folder`` with ``seed``, registered (not live); ``register`` goes to ``register_version``."""
    owner = platform.tenants.get_or_create_user(tenant_id=tenant_id, external_id=user)
    adapter = platform.registry.create_adapter(
        tenant_id=tenant_id, owner_user_id=owner.id, name="personal", target_config={}
    )
    return platform.registry.register_version(
        tenant_id=tenant_id,
        adapter_id=adapter.id,
        adapter_dir=write_adapter_dir(folder, seed=seed),
        base_fingerprint="f" * 64,
        **register,
    )
