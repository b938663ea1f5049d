"""The scheduler's blob scrub: budgeted windows (versions and bytes per tick) from a cursor kept in the database,
a corrupt blob found and logged, repaired only when asked, and the scheduler running it after its ticks."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from registry_helpers import RegistryEnv, registered_versions
from registry_helpers import statuses as _statuses
from sqlalchemy.orm import Session
from tests.blob_corruption import flip_byte

from lorafleet.config import load_settings
from lorafleet.domain import AdapterVersion
from lorafleet.errors import ValidationError
from lorafleet.jobs.scheduler import Scheduler
from lorafleet.runtime.job_commands import scheduler_tick
from lorafleet.store.sql.models import SqlScrubCursor, utcnow
from lorafleet.workflows.blob_verify import REPAIR_REASON, SCRUB_ACTOR, BlobScrubber, VerifyReport

SCRUB_LOG = "lorafleet.workflows.blob_verify"


def _versions(env: RegistryEnv) -> tuple[int, list[AdapterVersion]]:
    """Tenant A's ``chat`` with versions 1-4 (seeds 1-4), 1, 2, 3 promoted in turn: v3 live."""
    tenants = env.tenants
    return registered_versions(
        env.registry, env.adapter_dir, tenants.a, tenants.a_user, seeds=[1, 2, 3, 4], live=[1, 2, 3]
    )


def _checked(report: VerifyReport | None) -> list[int]:
    assert report is not None
    return [c.version.number for c in report.checks]


def test_the_scrub_checks_a_budgeted_window_per_tick_finds_and_logs_a_corrupt_blob(
    env: RegistryEnv, caplog: pytest.LogCaptureFixture
) -> None:
    database, registry, tenants = env.db, env.registry, env.tenants
    adapter_id, (v1, v2, v3, v4) = _versions(env)
    flip_byte(registry.blobs, v3.sha256)
    caplog.set_level(logging.INFO, logger=SCRUB_LOG)

    scrub = BlobScrubber(database, registry, versions_per_tick=2, bytes_per_tick=10**9)
    assert _checked(scrub.tick()) == [1, 2] and "is corrupt" not in caplog.text
    second = scrub.tick()
    assert _checked(second) == [3, 4]
    assert second is not None and [c.version.id for c in second.problems] == [v3.id]
    assert "blob scrub: tenant-a/alice/chat v3 is corrupt" in caplog.text
    assert "not repaired: LORAFLEET_SCRUB_REPAIR is off" in caplog.text
    assert _statuses(registry, tenants.a, adapter_id) == ["archived", "archived", "live", "candidate"]
    assert _checked(scrub.tick()) == [1, 2]  # past the last version: round again

    # the byte budget: one version per tick when two do not fit (and one at least, however small the budget)
    size = max(v.size_bytes for v in (v1, v2, v3, v4))
    by_bytes = BlobScrubber(database, registry, versions_per_tick=10, bytes_per_tick=size, name="bytes")
    assert [_checked(by_bytes.tick()) for _ in range(5)] == [[1], [2], [3], [4], [1]]
    tiny = BlobScrubber(database, registry, versions_per_tick=10, bytes_per_tick=1, name="tiny")
    assert _checked(tiny.tick()) == [1]
    report = tiny.tick()
    assert report is not None and report.bytes_read == v2.size_bytes

    # a budget of 0 turns it off
    for off in (
        BlobScrubber(database, registry, versions_per_tick=0, bytes_per_tick=size),
        BlobScrubber(database, registry, versions_per_tick=5, bytes_per_tick=0),
    ):
        assert not off.enabled and off.tick() is None
    with pytest.raises(ValidationError, match="budgets"):
        BlobScrubber(database, registry, versions_per_tick=-1, bytes_per_tick=size)


def test_two_scrubbers_share_the_cursor_and_a_repairing_scrub_quarantines(env: RegistryEnv) -> None:
    database, registry, tenants = env.db, env.registry, env.tenants
    adapter_id, (_, v2, v3, _) = _versions(env)
    flip_byte(registry.blobs, v3.sha256)
    one = BlobScrubber(database, registry, versions_per_tick=2, bytes_per_tick=10**9, repair=True)
    other = BlobScrubber(database, registry, versions_per_tick=2, bytes_per_tick=10**9, repair=True)
    assert _checked(one.tick()) == [1, 2]
    repaired = other.tick()  # the next window, not the same one
    assert _checked(repaired) == [3, 4] and repaired is not None and repaired.counts["repaired"] == 1
    assert _statuses(registry, tenants.a, adapter_id) == ["archived", "live", "corrupt", "candidate"]
    last = registry.alias_history(tenant_id=tenants.a, adapter_id=adapter_id)[-1]
    assert (last.from_version_id, last.to_version_id, last.actor, last.reason) == (
        v3.id,
        v2.id,
        SCRUB_ACTOR,
        REPAIR_REASON,
    )
    windows = [_checked(one.tick()) for _ in range(3)]  # the quarantined version is not read again
    assert windows == [[1, 2], [4], [1, 2]]


def test_the_scheduler_runs_the_scrub_after_its_ticks(
    env: RegistryEnv,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database, registry, tenants = env.db, env.registry, env.tenants
    adapter_id, versions = _versions(env)
    flip_byte(registry.blobs, versions[2].sha256)

    # the loop: the scrub's tick follows the scheduler's
    scrub = BlobScrubber(database, registry, versions_per_tick=4, bytes_per_tick=10**9, name="loop")
    stop = threading.Event()
    reports: list[VerifyReport | None] = []
    ticks = Scheduler(database).run_loop(
        interval_seconds=0.01, stop_event=stop, periodic=[lambda: reports.append(scrub.tick()), stop.set]
    )
    assert ticks == 1 and [len(r.problems) for r in reports if r is not None] == [1]

    # ``python -m services.scheduler --once`` (and ``lorafleet serve``): the settings' budget, the shared cursor
    caplog.set_level(logging.INFO, logger=SCRUB_LOG)
    blobs_url = registry.blobs.root.as_uri()  # type: ignore[attr-defined]
    common = {"database_url": database_url, "object_store_url": blobs_url, "data_dir": tmp_path}
    for _ in range(3):  # one version per tick: the corrupt v3 is the third
        scheduler_tick(load_settings(**common, scrub_versions_per_tick=1))
    assert "blob scrub: tenant-a/alice/chat v3 is corrupt" in caplog.text
    assert _statuses(registry, tenants.a, adapter_id)[2] == "live"  # LORAFLEET_SCRUB_REPAIR is off
    repair = load_settings(**common, scrub_versions_per_tick=10, scrub_repair=True, scrub_pass_seconds=0)
    scheduler_tick(repair)  # v4: the window ends at the last version
    assert _statuses(registry, tenants.a, adapter_id)[2] == "live"
    scheduler_tick(repair)  # round again: v1 to v4, v3 quarantined
    assert _statuses(registry, tenants.a, adapter_id) == ["archived", "live", "corrupt", "candidate"]
    caplog.clear()
    scheduler_tick(load_settings(**common, scrub_versions_per_tick=0))  # off: nothing read, nothing logged
    assert "blob scrub" not in caplog.text


def test_a_new_pass_waits_pass_seconds_after_the_last_one_ended(
    env: RegistryEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``pass_seconds``, a small registry is read once per pass, not at every tick: past the last version the
    scrub reads nothing (and logs nothing) until ``pass_seconds`` have gone by since that pass ended."""
    database, registry = env.db, env.registry
    _versions(env)
    caplog.set_level(logging.INFO, logger=SCRUB_LOG)
    scrub = BlobScrubber(
        database, registry, versions_per_tick=2, bytes_per_tick=10**9, name="paced", pass_seconds=3600
    )
    assert [_checked(scrub.tick()) for _ in range(4)] == [[1, 2], [3, 4], [], []]
    assert caplog.text.count("blob scrub: checked") == 2

    def ended_two_hours_ago(session: Session) -> None:
        cursor = session.get(SqlScrubCursor, "paced")
        assert cursor is not None and cursor.after_version_id == 0  # the pass ended: back at the start
        cursor.updated_at = utcnow() - timedelta(hours=2)

    database.run(ended_two_hours_ago)
    assert _checked(scrub.tick()) == [1, 2]  # the next pass
    with pytest.raises(ValidationError, match="pass_seconds"):
        BlobScrubber(database, registry, versions_per_tick=1, bytes_per_tick=1, pass_seconds=-1)
