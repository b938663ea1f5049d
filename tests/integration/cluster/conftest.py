"""Fixtures for the cluster tests: a data dir with the built-in tiny backbone, and one multi-node Ray cluster
on 127.0.0.1 for the module (a head without the trainer resource and two worker nodes with one unit each),
run in its own process by ``cluster_host.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import ClusterHost
from tests.tiny import tiny_backbone_dir


@pytest.fixture(scope="module")
def cluster_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the tiny backbone built into it (each trainer actor loads it from there)."""
    return tiny_backbone_dir(tmp_path_factory, "lorafleet-cluster-data")


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[ClusterHost]:
    """Head (1 CPU, no ``lorafleet_trainer``) + two worker nodes (1 CPU, ``lorafleet_trainer: 1`` each)."""
    host = ClusterHost({"workers": 2, "worker_cpus": 1, "worker_resources": {"lorafleet_trainer": 1}})
    try:
        yield host
    finally:
        host.close()
