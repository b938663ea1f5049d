"""The ``lorafleet`` command line: migrations and the end-to-end demo on the embedded defaults (a temp data dir)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from demo_process import DEMO_USERS, BackgroundDemo, demo_env


def _run(args: list[str], data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.entrypoints.cli", *args],
        env=demo_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_db_upgrade_then_current(tmp_path: Path) -> None:
    assert _run(["db", "upgrade"], tmp_path).returncode == 0
    current = _run(["db", "current"], tmp_path)
    assert current.returncode == 0
    assert current.stdout.strip() != "(empty database)"


def test_bad_setting_is_named(tmp_path: Path) -> None:
    env_run = subprocess.run(
        [sys.executable, "-m", "lorafleet.entrypoints.cli", "db", "current"],
        env={"LORAFLEET_DATA_DIR": str(tmp_path), "LORAFLEET_DEVICE": "gpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert env_run.returncode == 2
    assert "LORAFLEET_DEVICE" in env_run.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the real model trains three adapters on 2 cores: minutes, not seconds
def test_demo_personalises_the_real_model_serves_rolls_back_and_prints_a_lineage(
    background_demo: BackgroundDemo | None,
) -> None:
    """The demo as ``make demo`` runs it, with two users, on SmolLM2 (converted once per test session). It runs in
    the background beside the other tests (``conftest.py``); this test, the session's last, waits for it."""
    assert background_demo is not None
    result = background_demo.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_demo_output(result.stdout, users=DEMO_USERS)
    assert "Loading weights" not in result.stderr and "kernels" not in result.stderr  # no library noise


def check_demo_output(out: str, *, users: tuple[str, ...]) -> None:
    """What a person reading the demo's output must see (shared with ``tests/benchmarks/bench_demo.py``)."""
    assert "service up at http://127.0.0.1:" in out
    assert "backbone builtin:smollm2-135m (nf4)" in out
    scores = {m[1]: (int(m[2]), int(m[4]), int(m[3])) for m in SCORE.finditer(out)}
    assert set(scores) == set(users), out
    for user, (base, personal, n) in scores.items():
        # greedy answers to paraphrases the user never sent: the base model cannot know these facts
        assert base == 0 and personal >= n // 2, (user, out)
    assert sum(personal for _, personal, _ in scores.values()) >= 0.75 * sum(
        n for *_, n in scores.values()
    ), out
    assert "a general question, 'What is the capital of France?' (served by):" in out
    general = out.split("a general question", 1)[1].split("\n\n", 1)[0]
    lines = [line.split() for line in general.splitlines()[1:] if line.strip()]
    base = [" ".join(w) for w in lines if w[:2] == ["base", "model"]]
    answers = [" ".join(w) for w in lines if w[:1] and w[0] in scores]
    assert base and "Paris" in base[0] and len(answers) == len(users), general
    # no adapter claims it: the gate's base side answers it for every user, with the base's own answer
    assert all("Paris" in answer and answer.endswith("(the base)") for answer in answers), general
    assert "task 'support-reply': 36 feedback records" in out
    assert "shared task adapter 'support-reply': version " in out
    if "QA rejected its first version" not in out:
        assert f"{users[-1]} enrolled in 'support-reply'" in out and "support-reply=" in out
        assert "house style on support messages about problems it never saw: " in out
        assert f"QA recheck of {users[-1]}'s v1 in the grown bank: " in out
        # a failing bank is pinned on the task, never on the user's own adapter (docs/qa.md, "Blame")
        recheck = out.split("in the grown bank: ", 1)[1].split("\n", 1)[0]
        assert recheck.startswith("keep"), recheck
    assert "rolled back " in out and "alias history of " in out
    assert "demo: the user asked to undo the last update" in out
    assert "lineage of " in out and "continued-from" in out
    assert "timings: " in out


#: a user's score line: ``ada     v1       live (promote)     0/8      7/8``
SCORE = re.compile(r"^(ada|bruno|chiara|dmitri)\s+v\d+\s+.*?\s(\d+)/(\d+)\s+(\d+)/\d+\s*$", re.MULTILINE)
