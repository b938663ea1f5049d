"""``lorafleet verify`` against a temp SQLite data dir and its local blob directory: a flipped byte in a live
version's blob is reported, ``--repair`` quarantines it and rolls ``live`` back, ``lorafleet versions`` shows it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.blob_corruption import flip_byte
from tests.unit.registry.registry_helpers import write_adapter_dir

from lorafleet.domain import AdapterVersion
from lorafleet.entrypoints.cli import main
from lorafleet.platform import Platform


@dataclass
class Setup:
    platform: Platform
    tenant_id: int
    adapter_id: int
    versions: list[AdapterVersion]


@pytest.fixture
def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Setup]:
    """Tenant ``acme``: alice's ``personal`` v1..v3 promoted in turn (v3 live); tenant ``globex``: bob's v1 live."""
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    assert main(["db", "upgrade"]) == 0
    platform = Platform.from_settings()
    found: dict[str, tuple[int, int, list[AdapterVersion]]] = {}
    for tenant_name, user, seeds in (("acme", "alice", [1, 2, 3]), ("globex", "bob", [4])):
        tenant, _ = platform.tenants.create_tenant(name=tenant_name)
        owner = platform.tenants.get_or_create_user(tenant_id=tenant.id, external_id=user)
        adapter = platform.registry.create_adapter(
            tenant_id=tenant.id, owner_user_id=owner.id, name="personal", target_config={}
        )
        versions = []
        for seed in seeds:
            version = platform.registry.register_version(
                tenant_id=tenant.id,
                adapter_id=adapter.id,
                adapter_dir=write_adapter_dir(tmp_path / f"adapter-{seed}", seed=seed),
                base_fingerprint="f" * 64,
            )
            platform.registry.promote(
                tenant_id=tenant.id, adapter_id=adapter.id, number=version.number, actor="test"
            )
            versions.append(version)
        found[tenant_name] = (tenant.id, adapter.id, versions)
    capsys.readouterr()
    yield Setup(platform, *found["acme"])
    platform.close()


def _rows(out: str) -> dict[str, str]:
    """``lorafleet verify``'s lines by version label."""
    lines = [line.split(maxsplit=2) for line in out.splitlines()[1:]]
    return {f"{words[0]} {words[1]}": " ".join(words) for words in lines if "/" in words[0]}


def test_verify_reports_repairs_and_versions_shows_the_corrupt_status(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2, v3 = setup.versions
    flip_byte(setup.platform.blobs, v3.sha256)
    assert main(["versions", "--tenant", "acme", "--user", "alice"]) == 0
    assert "warning" not in capsys.readouterr().out  # a flipped byte is not known until something reads it

    assert main(["verify"]) == 1  # every tenant's versions; a bad one: exit 1
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {
        "acme/alice/personal v1",
        "acme/alice/personal v2",
        "acme/alice/personal v3",
        "globex/bob/personal v1",
    }
    assert (
        rows["acme/alice/personal v3"].split()[3:5] == ["live", "corrupt"]
        and "corrupted" in rows["acme/alice/personal v3"]
    )
    assert rows["acme/alice/personal v2"].split()[3:5] == ["archived", "ok"]
    assert "checked 4 versions" in out and "3 ok, 1 corrupt, 0 missing" in out and "0 quarantined now" in out
    assert "run `lorafleet verify --repair`" in out

    assert main(["verify", "--tenant", "globex"]) == 0  # one tenant's: only bob's, all fine
    assert set(_rows(capsys.readouterr().out)) == {"globex/bob/personal v1"}

    assert main(["verify", "--repair", "--only-bad"]) == 1  # found now (and repaired): still exit 1
    out = capsys.readouterr().out
    assert set(_rows(out)) == {"acme/alice/personal v3"}
    assert "quarantined; live rolled back to v2" in out and "1 quarantined now" in out

    assert main(["versions", "--tenant", "acme", "--user", "alice"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["3"][1] == "corrupt" and rows["2"][1:3] == ["live", "*"]
    assert lines[-1].startswith("warning: v3 corrupt")
    history = setup.platform.registry.alias_history(tenant_id=setup.tenant_id, adapter_id=setup.adapter_id)
    assert (
        history[-1].from_version_id,
        history[-1].to_version_id,
        history[-1].actor,
        history[-1].reason,
    ) == (
        v3.id,
        v2.id,
        "cli",
        "blob-corrupt",
    )

    assert main(["verify", "--repair", "--json"]) == 0  # nothing new
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {
        "checked": 4,
        "ok": 3,
        "corrupt": 0,
        "missing": 0,
        "unreadable": 0,
        "quarantined": 1,
        "repaired": 0,
    }
    assert [(v["number"], v["result"], v["status"]) for v in report["versions"] if v["tenant"] == "acme"] == [
        (1, "ok", "archived"),
        (2, "ok", "live"),
        (3, "quarantined", "corrupt"),
    ]
    assert v1.id in [v["version_id"] for v in report["versions"]]


def test_verify_of_an_unknown_tenant_exits_2(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--tenant", "nope"]) == 2
    assert "error [not_found]" in capsys.readouterr().err
