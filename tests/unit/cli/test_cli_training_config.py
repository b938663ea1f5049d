"""``lorafleet training-config show|set`` against a temp SQLite data dir: overrides round-trip and reset, and a bad
field exits 2 naming it, changing nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.entrypoints.cli import main
from lorafleet.training.config import TrainingConfig


@pytest.fixture
def tenant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """A migrated data dir with tenant ``acme`` (made by the CLI)."""
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_TRAINER_MAX_RANK", "12")
    assert main(["db", "upgrade"]) == 0
    assert main(["tenants", "create", "acme"]) == 0
    capsys.readouterr()
    return "acme"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    status = main(["training-config", *args])
    out, err = capsys.readouterr()
    return status, json.loads(out) if out.strip() else None, err


def test_show_set_and_reset(tenant: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, shown, _ = _run(capsys, "show", "--tenant", tenant)
    defaults = TrainingConfig().model_dump(mode="json")
    assert status == 0 and shown == {"tenant": "acme", "overrides": {}, "effective": defaults, "max_rank": 12}

    status, saved, _ = _run(capsys, "set", "--tenant", tenant, '{"learning_rate": 1e-3, "layers": "top 1"}')
    assert status == 0 and saved["overrides"] == {"learning_rate": 1e-3, "layers": "top 1"}
    assert saved["effective"] == {**defaults, "learning_rate": 1e-3, "layers": "top 1"}
    assert _run(capsys, "show", "--tenant", tenant)[1] == saved

    status, reset, _ = _run(capsys, "set", "--tenant", tenant, "--reset")
    assert status == 0 and reset["overrides"] == {} and reset["effective"] == defaults


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (['{"learning_rate": 1}'], "learning_rate: "),
        (['{"rank": 16}'], "rank: 16 is above the trainers' maximum rank 12"),
        (['{"lr": 0.001}'], "lr: "),
        (["not json"], "overrides: not JSON"),
        (["[1, 2]"], "training_config: must be an object"),
        ([], "overrides: give a JSON object"),
        (['{"seed": 1}', "--reset"], "overrides: give a JSON object"),
    ],
)
def test_a_bad_set_exits_2_naming_the_field_and_changes_nothing(
    tenant: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _run(capsys, "set", "--tenant", tenant, '{"seed": 5}')[0] == 0
    status, _, err = _run(capsys, "set", "--tenant", tenant, *args)
    assert status == 2 and message in err, err
    assert _run(capsys, "show", "--tenant", tenant)[1]["overrides"] == {"seed": 5}


def test_an_unknown_tenant_is_an_error(tenant: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "show", "--tenant", "nope")
    assert status == 2 and "tenant 'nope' not found" in err
