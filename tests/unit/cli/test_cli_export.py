"""``lorafleet export`` on SQLite and PostgreSQL: a version as a PEFT folder archive, a user's and a task's feedback
as JSON Lines (every record, oldest first, in the API's shape), and refusals that write nothing."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import personal_version, platform_from_env

from lorafleet.domain import AuditAction
from lorafleet.entrypoints import export as export_module
from lorafleet.entrypoints.cli import main
from lorafleet.platform import Platform
from lorafleet.sdk.schemas import FeedbackRecordOut
from lorafleet.workflows.audit import list_events
from lorafleet.workflows.feedback import ingest_feedback, list_feedback
from lorafleet.workflows.tasks import ingest_task_feedback


@dataclass
class Setup:
    platform: Platform
    tenant_id: int
    out: Path


@pytest.fixture
def setup(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """Tenant ``acme``; alice with version 1 of ``personal`` and five records, task ``sql`` with two."""
    platform = platform_from_env(monkeypatch, tmp_path, database_url)
    tenant, _ = platform.tenants.create_tenant(name="acme")
    personal_version(platform, tenant_id=tenant.id, user="alice", folder=tmp_path / "adapter", seed=1)
    records = [{"kind": "sft", "prompt": f"q{i}", "completion": "é"} for i in range(5)]
    ingest_feedback(platform.db, tenant_id=tenant.id, user_external_id="alice", records=records)
    ingest_task_feedback(platform.db, tenant_id=tenant.id, task_name="sql", records=records[:2])
    yield Setup(platform, tenant.id, tmp_path / "out")
    platform.close()


def test_export_writes_a_version_archive(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["export", "--tenant", "acme", "--user", "alice", "--version", "1", "--out", str(setup.out)]
    assert main(argv) == 0
    path = setup.out / "personal-v1.tar.gz"
    assert str(path) in capsys.readouterr().out
    with tarfile.open(path, mode="r:gz") as tar:
        names = sorted(tar.getnames())
        config_file = tar.extractfile("personal-v1/adapter_config.json")
        assert config_file is not None
        config = json.loads(config_file.read())
    assert names == [
        "personal-v1/adapter_config.json",
        "personal-v1/adapter_model.safetensors",
        "personal-v1/lorafleet_export.json",
    ]
    assert config["base_model_name_or_path"] == "builtin:tiny"  # the tests' backbone (LORAFLEET_BACKBONE)
    exports = list_events(setup.platform.db, tenant_id=setup.tenant_id, action=AuditAction.EXPORT_VERSION)
    assert [(e.actor, e.target) for e in exports] == [("cli", "user:alice/personal@1")]


def test_export_writes_feedback_as_json_lines(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export_module, "EXPORT_PAGE", 2)  # five records: three pages
    argv = ["export", "--tenant", "acme", "--user", "alice", "--feedback", "--out", str(setup.out)]
    assert main(argv) == 0
    lines = (setup.out / "alice-feedback.jsonl").read_text(encoding="utf-8").splitlines()
    stored = list_feedback(setup.platform.db, tenant_id=setup.tenant_id, user_external_id="alice")
    expected = [
        FeedbackRecordOut.model_validate(r, from_attributes=True).model_dump(mode="json") for r in stored
    ]
    assert [json.loads(line) for line in lines] == expected
    assert [json.loads(line)["payload"]["prompt"] for line in lines] == [f"q{i}" for i in range(5)]

    assert main(["export", "--tenant", "acme", "--task", "sql", "--feedback", "--out", str(setup.out)]) == 0
    task_lines = (setup.out / "task-sql-feedback.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["payload"]["prompt"] for line in task_lines] == ["q0", "q1"]


def test_export_refusals_write_nothing(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(setup.out)
    assert main(["export", "--tenant", "acme", "--user", "alice", "--version", "9", "--out", out]) == 2
    assert main(["export", "--tenant", "acme", "--user", "nobody", "--feedback", "--out", out]) == 2
    assert main(["export", "--tenant", "acme", "--task", "none", "--version", "1", "--out", out]) == 2
    both = ["export", "--tenant", "acme", "--user", "alice", "--task", "sql", "--feedback", "--out", out]
    assert main(both) == 2
    assert "exactly one of --user and --task" in capsys.readouterr().err
    assert not setup.out.exists() or list(setup.out.iterdir()) == []
    exports = [
        e
        for e in list_events(setup.platform.db, tenant_id=setup.tenant_id)
        if e.action in (AuditAction.EXPORT_VERSION, AuditAction.EXPORT_FEEDBACK)
    ]
    assert exports == []  # a refused export is not audited
