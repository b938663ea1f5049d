"""``lorafleet forget records`` and ``lorafleet receipt`` on SQLite: forget by ids and by a metadata tag, revoke the
version trained on the record, print the receipt (text and ``--json``), and refuse bad input changing nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import personal_version, platform_from_env

from lorafleet.entrypoints.cli import main
from lorafleet.platform import Platform
from lorafleet.store.sql.feedback import create_snapshot
from lorafleet.workflows.feedback import ingest_feedback, list_feedback


@dataclass
class Setup:
    platform: Platform
    tenant_id: int
    ids: list[int]
    adapter_id: int


@pytest.fixture
def setup(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """Tenant ``acme``; alice with four records (two tagged ``session=a``) and live version 1 trained on the first."""
    platform = platform_from_env(monkeypatch, tmp_path, sqlite_url)
    tenant, _ = platform.tenants.create_tenant(name="acme")
    records = [
        {"kind": "sft", "prompt": f"q{i}", "completion": "a", "metadata": {"session": "a" if i % 2 else "b"}}
        for i in range(4)
    ]
    ids = ingest_feedback(platform.db, tenant_id=tenant.id, user_external_id="alice", records=records).ids
    user = platform.tenants.get_user(tenant_id=tenant.id, external_id="alice")
    snapshot = create_snapshot(platform.db, user_id=user.id, record_ids=ids[:1])
    version = personal_version(
        platform,
        tenant_id=tenant.id,
        user="alice",
        folder=tmp_path / "adapter",
        seed=1,
        dataset_snapshot_id=snapshot.id,
    )
    platform.registry.promote(tenant_id=tenant.id, adapter_id=version.adapter_id, number=1, actor="test")
    yield Setup(platform, tenant.id, ids, version.adapter_id)
    platform.close()


def test_forget_records_by_ids_and_by_tag_then_read_the_receipt(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["forget", "records", "--tenant", "acme", "--user", "alice", "--ids", str(setup.ids[0]), "--json"]
    assert main(argv) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["subject"] == "user:alice" and receipt["actor"] == "cli"
    # the API's shape and format: UTC times with a "Z" (as GET /v1/deletions/{id} answers)
    assert receipt["created_at"].endswith("Z") and receipt["purge_after"].endswith("Z")
    assert [(v["adapter"], v["number"]) for v in receipt["revoked_versions"]] == [("personal", 1)]
    assert (
        receipt["rebuild"]["job_state"] == "queued"
    )  # records 2-4 remain: the adapter is rebuilt from scratch

    assert main(["receipt", receipt["id"], "--tenant", "acme"]) == 0
    text = capsys.readouterr().out
    assert receipt["id"] in text and "revoked: personal version 1" in text and "queued" in text

    assert main(["forget", "records", "--tenant", "acme", "--user", "alice", "--tag", "session=a"]) == 0
    left = list_feedback(setup.platform.db, tenant_id=setup.tenant_id, user_external_id="alice")
    assert [r.id for r in left] == [setup.ids[2]]


def test_bad_input_is_refused_and_changes_nothing(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["forget", "records", "--tenant", "acme"]
    for argv, said in [
        ([*base, "--user", "alice"], "filter:"),
        ([*base, "--user", "alice", "--ids", "x"], "ids:"),
        ([*base, "--user", "alice", "--ids", "1", "--tag", "k=v"], "ids:"),
        ([*base, "--user", "alice", "--since", "2026-01-01"], "filter.since:"),
        ([*base, "--user", "alice", "--tag", "novalue"], "filter.metadata:"),
        ([*base, "--user", "alice", "--task", "t", "--ids", "1"], "exactly one of --user and --task"),
        ([*base, "--user", "nobody", "--ids", "1"], "not found"),
        (["receipt", "del_nope", "--tenant", "acme"], "receipt_id:"),
    ]:
        assert main(argv) == 2, argv
        assert said in capsys.readouterr().err, argv
    left = list_feedback(setup.platform.db, tenant_id=setup.tenant_id, user_external_id="alice")
    assert [r.id for r in left] == setup.ids
    live = setup.platform.registry.live_version(tenant_id=setup.tenant_id, adapter_id=setup.adapter_id)
    assert live is not None and live.number == 1
