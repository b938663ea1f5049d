"""``lorafleet gc`` and the scheduler's periodic gc: the blobs of an erased user go once their deletion's hold has
ended (here a grace period of 0), another user's blobs stay; the periodic task runs at most once per interval and
logs a failure instead of raising it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cli_helpers import personal_version

from lorafleet.entrypoints.cli import main
from lorafleet.platform import Platform
from lorafleet.registry.gc import PeriodicGc
from lorafleet.workflows.erasure import forget_user
from lorafleet.workflows.feedback import ingest_feedback


def test_gc_deletes_an_erased_users_blobs_once_the_hold_ends_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_BLOB_GC_GRACE_SECONDS", "0")
    assert main(["db", "upgrade"]) == 0
    with Platform.from_settings() as platform:
        tenant, _ = platform.tenants.create_tenant(name="acme")
        shas = {}
        for seed, name in enumerate(("alice", "bob")):
            records = [{"kind": "sft", "prompt": f"{name} says hi", "completion": "Hello."}]
            ingest_feedback(platform.db, tenant_id=tenant.id, user_external_id=name, records=records)
            folder = tmp_path / f"adapter-{seed}"
            version = personal_version(platform, tenant_id=tenant.id, user=name, folder=folder, seed=seed)
            shas[name] = version.sha256
        receipt = forget_user(
            platform.db, platform.registry, tenant_id=tenant.id, external_id="alice", actor="test"
        )
        assert receipt.blobs == (shas["alice"],) and receipt.blobs_deleted_at is None
        assert platform.blobs.exists(shas["alice"])
    capsys.readouterr()

    assert main(["gc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": [shas["alice"]]}
    with Platform.from_settings() as platform:
        assert not platform.blobs.exists(shas["alice"]) and platform.blobs.exists(shas["bob"])
    assert main(["gc"]) == 0
    assert capsys.readouterr().out.strip() == "deleted 0 blobs"


def test_periodic_gc_runs_at_most_once_per_interval_and_logs_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    calls: list[float] = []

    def collect() -> list[str]:
        calls.append(now[0])
        if len(calls) == 2:
            raise OSError("object store down")
        return ["a" * 64]

    task = PeriodicGc(collect, interval_seconds=60, clock=lambda: now[0])
    assert task.enabled and task() == ["a" * 64]
    now[0] = 159.0
    assert task() == [] and calls == [100.0]
    now[0] = 160.0
    with caplog.at_level(logging.ERROR, logger="lorafleet.registry.gc"):
        assert task() == []
    assert "blob gc failed" in caplog.text and calls == [100.0, 160.0]
    now[0] = 220.0
    assert task() == ["a" * 64]
    assert not PeriodicGc(collect, interval_seconds=0).enabled
