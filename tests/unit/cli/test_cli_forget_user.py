"""``lorafleet forget user`` against a temp SQLite data dir and its local blob directory: the user goes, the
receipt is printed (as JSON with ``--json``), ``--purge`` deletes the blobs at once, an unknown user is exit 2 and
changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import personal_version

from lorafleet.entrypoints.cli import main
from lorafleet.platform import Platform
from lorafleet.store.sql.receipts import get_receipt
from lorafleet.workflows.feedback import ingest_feedback


@dataclass
class Setup:
    platform: Platform
    tenant_id: int
    shas: dict[str, str]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """Tenant ``acme``: alice and bob, each with two records and version 1 of ``personal``."""
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    assert main(["db", "upgrade"]) == 0
    platform = Platform.from_settings()
    tenant, _ = platform.tenants.create_tenant(name="acme")
    shas = {}
    for seed, name in enumerate(("alice", "bob")):
        records = [{"kind": "sft", "prompt": f"{name} {i}", "completion": "An answer."} for i in range(2)]
        ingest_feedback(platform.db, tenant_id=tenant.id, user_external_id=name, records=records)
        folder = tmp_path / f"adapter-{seed}"
        version = personal_version(platform, tenant_id=tenant.id, user=name, folder=folder, seed=seed)
        shas[name] = version.sha256
    yield Setup(platform, tenant.id, shas)
    platform.close()


def test_forget_user_prints_the_receipt_and_keeps_the_blobs_until_the_grace(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["forget", "user", "alice", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert "forgot user:alice: receipt del_" in out and "versions: personal@1" in out
    assert "records: 2" in out and "held until" in out
    assert [u.external_id for u in setup.platform.tenants.list_users(tenant_id=setup.tenant_id)] == ["bob"]
    assert setup.platform.registry.blobs.exists(setup.shas["alice"])

    assert main(["forget", "user", "alice", "--tenant", "acme"]) == 2  # gone: not found
    assert "not_found" in capsys.readouterr().err


def test_forget_user_json_and_purge(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["forget", "user", "bob", "--tenant", "acme", "--purge", "--json"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert (receipt["kind"], receipt["subject"], receipt["actor"]) == ("user", "user:bob", "cli")
    assert receipt["request"] == {"purge": True} and receipt["blobs"] == [setup.shas["bob"]]
    assert receipt["erased"]["feedback"] == 2 and receipt["blobs_deleted_at"].endswith("Z")
    assert receipt["created_at"].endswith("Z") and receipt["rebuild"] is None  # the API's format
    assert not setup.platform.registry.blobs.exists(setup.shas["bob"])
    assert setup.platform.registry.blobs.exists(setup.shas["alice"])
    stored = setup.platform.db.run(get_receipt, tenant_id=setup.tenant_id, receipt_id=receipt["id"])
    assert list(stored.blobs) == [setup.shas["bob"]]
    assert main(["forget", "user", "carol", "--tenant", "acme"]) == 2
    assert [u.external_id for u in setup.platform.tenants.list_users(tenant_id=setup.tenant_id)] == ["alice"]
