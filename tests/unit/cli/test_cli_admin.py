"""The ``lorafleet`` admin and inspection commands against a temp SQLite data dir (the library sets up versions)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.unit.registry.registry_helpers import write_adapter_dir

from lorafleet.entrypoints.admin import serve_options
from lorafleet.entrypoints.cli import build_parser, main
from lorafleet.platform import Platform
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database


@dataclass
class Setup:
    tenant: str
    data_dir: Path
    db: Database
    registry: Registry
    tenant_id: int
    adapter_id: int


@pytest.fixture
def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Setup]:
    """A migrated data dir; tenant ``acme`` (made by the CLI), user ``alice`` with versions 1..3 of
    ``personal`` (each continued from the last), v3 live."""
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    assert main(["db", "upgrade"]) == 0
    assert main(["tenants", "create", "acme"]) == 0
    out = capsys.readouterr().out
    assert "tenant 'acme'" in out and "api key (shown only now): " in out

    platform = Platform.from_settings(migrate=True)
    db, registry, tenants = platform.db, platform.registry, platform.tenants
    tenant = tenants.get_tenant(name="acme")
    user = tenants.get_or_create_user(tenant_id=tenant.id, external_id="alice")
    tenants.get_or_create_user(tenant_id=tenant.id, external_id="bob")
    adapter = registry.create_adapter(
        tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={"rank": 4}
    )
    parent = None
    for number in (1, 2, 3):
        folder = write_adapter_dir(tmp_path / f"adapter-{number}", seed=number)
        version = registry.register_version(
            tenant_id=tenant.id,
            adapter_id=adapter.id,
            adapter_dir=folder,
            base_fingerprint="f" * 64,
            parents=[(parent.id, "continued-from")] if parent else [],
            metrics={"holdout_sequence_accuracy_before": 0.125, "holdout_sequence_accuracy_after": 0.75},
        )
        registry.promote(tenant_id=tenant.id, adapter_id=adapter.id, number=number, actor="test", reason="ok")
        parent = version
    yield Setup("acme", tmp_path, db, registry, tenant.id, adapter.id)
    platform.close()


def test_users_lists_users_and_live_versions(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "personal:v3" in out
    assert "bob" in out


def test_users_json_has_counts_and_live_versions(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "--tenant", "acme", "--json"]) == 0
    listed = {u["external_id"]: u for u in json.loads(capsys.readouterr().out)}
    assert list(listed) == ["alice", "bob"]
    assert (listed["alice"]["version_count"], listed["alice"]["live_versions"]) == (3, {"personal": 3})
    assert (listed["bob"]["feedback_count"], listed["bob"]["last_feedback_at"]) == (0, None)


def test_audit_lists_cli_changes_and_filters(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["rollback", "--tenant", "acme", "--user", "alice", "--reason", "private words"]
    assert main([*args, "--to", "1"]) == 0
    assert main(["tenants", "create", "other"]) == 0
    capsys.readouterr()
    assert main(["audit", "--tenant", "acme", "--json"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [(e["action"], e["actor"], e["target"]) for e in events] == [
        ("tenant.created", "cli", "tenant:acme"),
        ("rollback", "cli", "user:alice/personal@1"),
    ]
    assert "private words" not in json.dumps(events)
    assert main(["audit", "--action", "tenant.created"]) == 0
    table = capsys.readouterr().out
    assert "tenant:acme" in table and "tenant:other" in table and "rollback" not in table
    assert main(["audit", "--action", "bogus"]) == 2
    assert "--action" in capsys.readouterr().err


def test_versions_marks_the_live_one_and_shows_accuracy(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["versions", "--tenant", "acme", "--user", "alice"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"1", "2", "3"}
    assert "*" in rows["3"] and "*" not in rows["1"]
    assert "12% / 75%" in rows["2"]


def test_lineage_prints_the_chain(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lineage", "--tenant", "acme", "--user", "alice", "--version", "3"]) == 0
    assert "lineage of alice/personal v3: v1 -> v2 -> v3" in capsys.readouterr().out


def test_rollback_moves_live_and_is_recorded(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["rollback", "--tenant", "acme", "--user", "alice", "--reason", "bad answers"]
    assert main([*args, "--to", "1"]) == 0
    assert "live is now v1" in capsys.readouterr().out
    live = setup.registry.live_version(tenant_id=setup.tenant_id, adapter_id=setup.adapter_id)
    assert live is not None and live.number == 1
    last = setup.registry.alias_history(tenant_id=setup.tenant_id, adapter_id=setup.adapter_id)[-1]
    assert (last.actor, last.reason) == ("cli", "bad answers")

    assert main([*args, "--to", "none"]) == 0
    assert "live is now none" in capsys.readouterr().out
    assert setup.registry.live_version(tenant_id=setup.tenant_id, adapter_id=setup.adapter_id) is None


def test_errors_exit_2_with_the_reason(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["rollback", "--tenant", "acme", "--user", "alice", "--reason", "x"]
    assert main([*args, "--to", "3"]) == 2  # not earlier than live
    assert "error [" in capsys.readouterr().err
    assert main([*args, "--to", "soon"]) == 2
    assert "--to" in capsys.readouterr().err
    assert main(["versions", "--tenant", "acme", "--user", "nobody"]) == 2
    assert main(["versions", "--tenant", "nope", "--user", "alice"]) == 2
    assert main(["tenants", "create", "acme"]) == 2  # the name is taken
    capsys.readouterr()


def test_serve_help_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--workers", "--scheduler-interval", "--serving-threads"):
        assert option in out


def test_serve_threads_reach_the_api_options() -> None:
    parser = build_parser()
    assert serve_options(parser.parse_args(["serve"])).serving_threads is None  # automatic
    options = serve_options(parser.parse_args(["serve", "--workers", "2", "--serving-threads", "3"]))
    assert (options.serving_threads, options.run_workers) == (3, 2)


@pytest.mark.parametrize(
    ("value", "reason"), [("0", "must be at least 1, got 0"), ("two", "not a whole number")]
)
def test_serve_threads_not_a_count_is_refused(
    value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--serving-threads", value])
    assert exited.value.code == 2
    assert f"argument --serving-threads: {reason}" in capsys.readouterr().err


def test_tenants_keys_lists_and_revoke_key_revokes(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafleet.errors import AuthError

    platform = Platform.from_settings()
    key = platform.tenants.create_api_key(tenant_id=setup.tenant_id)
    platform.tenants.authenticate(api_key=key)
    capsys.readouterr()
    assert main(["tenants", "keys", "acme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    prefix = lines[2].split()[1].removesuffix("...")
    assert (
        len(lines) == 3 and key.startswith(prefix) and len(prefix) < len(key)
    )  # header, the first key, this one
    assert key not in "\n".join(lines)
    key_id = int(lines[2].split()[0])
    assert main(["tenants", "revoke-key", "acme", str(key_id)]) == 0
    assert f"API key {key_id} ({prefix}...) of 'acme' revoked" in capsys.readouterr().out
    with pytest.raises(AuthError, match="revoked"):
        platform.tenants.authenticate(api_key=key)
    platform.close()
