"""The ``lorafleet`` command line: migrations and the end-to-end demo on the embedded defaults (a temp data dir)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"LORAFLEET_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args], env=env, capture_output=True, text=True, timeout=900
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
def test_demo_trains_serves_rolls_back_and_prints_a_lineage(tmp_path: Path) -> None:
    result = _run(["demo"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "service up at http://127.0.0.1:" in out
    rows = [
        line for line in out.splitlines() if line.split()[:1] in (["ada"], ["bruno"], ["chiara"], ["dmitri"])
    ]
    for user in ("ada", "bruno", "chiara", "dmitri"):
        # every user got a QA decision: live, or an honest rejection line
        decided = [r for r in rows if r.startswith(user) and (" live (" in r or " rejected (" in r)]
        assert decided, out
    # the shared task adapter was trained with the users; one user joined it and the gate's weights were shown
    assert "task 'pig-latin': 48 feedback records submitted" in out
    assert "shared task adapter 'pig-latin': version " in out
    if "version 1 live" in out:
        assert "dmitri enrolled in 'pig-latin'" in out and "gate weights" in out and "pig-latin=" in out
        assert "QA recheck of dmitri's v1 in the grown bank: " in out
    else:
        assert "QA rejected its first version" in out
    assert "rolled back " in out and "answers changed" in out
    assert " -> none" in out or "-> v1" in out  # the alias history records the rollback
    assert "demo: user reported odd answers" in out
    assert "lineage of " in out
    assert "timings: " in out
