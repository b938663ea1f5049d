"""Fixtures for backbone tests: the built-in tiny backbone, built once per session into a temp data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.backbone import build_tiny_backbone


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lorafleet-backbone-data")


@pytest.fixture(scope="session")
def tiny_dir(data_dir: Path) -> Path:
    return build_tiny_backbone(data_dir)
