"""Fixtures for the routing tests: a registry over the real databases (local blobs) and a small world."""

from __future__ import annotations

from pathlib import Path

import pytest
from routing_helpers import World, make_world

from lorafleet.registry import Registry
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database


@pytest.fixture
def world(database: Database) -> World:
    return make_world(database)


@pytest.fixture
def registry(database: Database, tmp_path: Path) -> Registry:
    """Over both databases and a local blob directory (the blob stores have their own tests)."""
    return Registry(database, open_blob_store((tmp_path / "blobs").as_uri()))
