"""The ``lorafleet`` command line: migrations and the demo on the embedded defaults (a temp data dir)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"LORAFLEET_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_db_upgrade_then_current(tmp_path: Path) -> None:
    assert _run(["db", "upgrade"], tmp_path).returncode == 0
    current = _run(["db", "current"], tmp_path)
    assert current.returncode == 0
    assert current.stdout.strip() != "(empty database)"


def test_bad_setting_is_named(tmp_path: Path) -> None:
    env_run = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "db", "current"],
        env={"LORAFLEET_DATA_DIR": str(tmp_path), "LORAFLEET_DEVICE": "gpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert env_run.returncode == 2
    assert "LORAFLEET_DEVICE" in env_run.stderr


@pytest.mark.slow
def test_demo_runs_and_rollback_restores_version_one(tmp_path: Path) -> None:
    result = _run(["demo"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "live version after rollback: 1" in result.stdout
    assert "identical to v1's logits: True" in result.stdout
    assert "lineage of version 3: v1 -> v2 -> v3" in result.stdout
