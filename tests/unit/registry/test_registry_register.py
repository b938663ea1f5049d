"""Registering versions: validation before any write, blob-then-row, deterministic archives, fetch, GC."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import TwoTenants, blob_digests, count_versions, version_count
from tests.faults import FaultyBlobs

from lorafleet.domain import AdapterVersion
from lorafleet.errors import (
    AdapterFormatError,
    BlobIntegrityError,
    NonFiniteError,
    UnsafeFormatError,
    ValidationError,
)
from lorafleet.registry import Registry, unpack_adapter_archive
from lorafleet.registry.peft_format import inspect_adapter_dir
from lorafleet.store.blob import BlobStore, LocalBlobStore
from lorafleet.store.blob.base import BlobRef
from lorafleet.store.sql.database import Database

FAR_FUTURE = datetime.now(UTC) + timedelta(days=3650)


def _adapter(registry: Registry, tenants: TwoTenants, name: str = "chat") -> int:
    return registry.create_adapter(
        tenant_id=tenants.a, owner_user_id=tenants.a_user, name=name, target_config={"r": 4}
    ).id


def _register(
    registry: Registry, tenants: TwoTenants, adapter_id: int, folder: Path, **kw: Any
) -> AdapterVersion:
    """Register ``folder`` as the next version of tenant A's adapter (base fingerprint ``fp`` unless given)."""
    return registry.register_version(
        tenant_id=tenants.a, adapter_id=adapter_id, adapter_dir=folder, **{"base_fingerprint": "fp", **kw}
    )


def test_register_records_metadata_and_numbers_versions(
    registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    adapter_id = _adapter(registry, tenants)
    first = _register(
        registry,
        tenants,
        adapter_id,
        make_adapter_dir(seed=1, rank=4),
        base_fingerprint="tiny-v1",
        training_config={"lr": 1e-4},
        metrics={"loss": 0.5},
    )
    second = _register(
        registry, tenants, adapter_id, make_adapter_dir(seed=2, rank=8), base_fingerprint="tiny-v1"
    )
    assert (first.number, second.number) == (1, 2)
    assert (first.rank, second.rank) == (4, 8)
    assert first.target_modules == ("q_proj", "v_proj")
    assert first.status == "candidate" and first.training_config == {"lr": 1e-4}
    assert first.metrics == {"loss": 0.5} and first.sha256 != second.sha256
    assert registry.get_version(tenant_id=tenants.a, adapter_id=adapter_id, number=1) == first
    assert [v.number for v in registry.list_versions(tenant_id=tenants.a, adapter_id=adapter_id)] == [1, 2]
    assert registry.list_versions(tenant_id=tenants.a, adapter_id=adapter_id, status="live") == []


def test_regex_target_modules_are_read_from_tensor_names(
    local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    folder = make_adapter_dir(target_modules=r".*\.(q_proj|v_proj)")
    version = _register(local_registry, tenants, _adapter(local_registry, tenants), folder)
    assert version.target_modules == ("q_proj", "v_proj")


def test_same_content_gives_same_blob_regardless_of_mtime(
    registry: Registry,
    blob_store: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    adapter_id = _adapter(registry, tenants)
    original = make_adapter_dir(seed=7)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    for path in copy.iterdir():
        os.utime(path, (1_000_000, 1_000_000))
    one = _register(registry, tenants, adapter_id, original)
    two = _register(registry, tenants, adapter_id, copy)
    assert one.sha256 == two.sha256 and one.size_bytes == two.size_bytes
    assert blob_digests(blob_store) == {one.sha256}


def test_fetch_version_round_trips_the_files(
    registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    adapter_id = _adapter(registry, tenants)
    source = make_adapter_dir(seed=3)
    version = _register(registry, tenants, adapter_id, source)
    fetched = registry.fetch_version(version=version, dest_dir=tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (fetched / name).read_bytes() == (source / name).read_bytes()
    assert inspect_adapter_dir(fetched).rank == 4


def test_fetch_refuses_a_corrupted_blob(
    database: Database, tenants: TwoTenants, make_adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    registry = Registry(database, blobs)
    adapter_id = _adapter(registry, tenants)
    version = _register(registry, tenants, adapter_id, make_adapter_dir())
    stored = blobs.path_for(version.sha256)
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x01")
    with pytest.raises(BlobIntegrityError):
        registry.fetch_version(version=version, dest_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# --- bad input: refused with nothing written -------------------------------------------------------------
def _add_bin(path: Path) -> None:
    (path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")


def _oversized_header(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 64 * 1024 * 1024) + b"{}")


def _truncate(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def _drop_config(path: Path) -> None:
    (path / "adapter_config.json").unlink()


def _drop_weights(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()


def _bad_config(path: Path) -> None:
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}', encoding="utf-8")


@pytest.mark.parametrize(
    ("spoil", "poison", "error"),
    [
        (_add_bin, None, UnsafeFormatError),
        (_oversized_header, None, AdapterFormatError),
        (_truncate, None, AdapterFormatError),
        (_drop_config, None, AdapterFormatError),
        (_drop_weights, None, AdapterFormatError),
        (_bad_config, None, AdapterFormatError),
        (None, float("nan"), NonFiniteError),
        (None, float("inf"), NonFiniteError),
    ],
    ids=["pickle-bin", "header-over-cap", "truncated", "no-config", "no-weights", "rank-0", "nan", "inf"],
)
def test_bad_adapter_folders_write_nothing(
    registry: Registry,
    database: Database,
    blob_store: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
    spoil: Callable[[Path], None] | None,
    poison: float | None,
    error: type[Exception],
) -> None:
    adapter_id = _adapter(registry, tenants)
    folder = make_adapter_dir(poison=poison)
    if spoil is not None:
        spoil(folder)
    with pytest.raises(error):
        _register(registry, tenants, adapter_id, folder)
    assert count_versions(database) == 0 and version_count(database, adapter_id) == 0
    assert blob_digests(blob_store) == set()


def test_configured_header_cap_is_enforced(
    database: Database,
    local_blobs: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
) -> None:
    registry = Registry(database, local_blobs, max_header_bytes=64)
    adapter_id = _adapter(registry, tenants)
    with pytest.raises(AdapterFormatError, match="exceeds the cap of 64"):
        _register(registry, tenants, adapter_id, make_adapter_dir())
    assert count_versions(database) == 0 and blob_digests(local_blobs) == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_fingerprint": ""},
        {"status": "live"},
        {"metrics": {"loss": float("nan")}},
        {"training_config": {"fn": object()}},
        {"parents": [(1, "forked-from")]},
    ],
    ids=["no-fingerprint", "status-live", "nan-metric", "not-json", "bad-relation"],
)
def test_bad_arguments_write_nothing(
    local_registry: Registry,
    database: Database,
    local_blobs: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
    kwargs: dict[str, object],
) -> None:
    adapter_id = _adapter(local_registry, tenants)
    args: dict[str, object] = {"base_fingerprint": "fp", **kwargs}
    with pytest.raises(ValidationError):
        local_registry.register_version(
            tenant_id=tenants.a,
            adapter_id=adapter_id,
            adapter_dir=make_adapter_dir(),
            **args,  # type: ignore[arg-type]
        )
    assert count_versions(database) == 0 and blob_digests(local_blobs) == set()


# --- crash between blob and row, and the garbage collector ---------------------------------------------
def _crash(ref: BlobRef) -> None:
    raise RuntimeError(f"injected crash after writing {ref.sha256}")


def test_crash_after_blob_write_leaves_only_an_orphan_that_gc_removes(
    database: Database,
    blob_store: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
) -> None:
    crashing = Registry(database, FaultyBlobs(blob_store, after_put_file=_crash), gc_grace_seconds=3600)
    adapter_id = _adapter(crashing, tenants)
    with pytest.raises(RuntimeError, match="injected crash"):
        _register(crashing, tenants, adapter_id, make_adapter_dir(seed=5))
    assert count_versions(database) == 0 and version_count(database, adapter_id) == 0
    (orphan,) = blob_digests(blob_store)

    registry = Registry(database, blob_store, gc_grace_seconds=3600)
    assert registry.gc() == []  # still inside the grace period
    assert registry.gc(now=datetime.now(UTC) + timedelta(seconds=3601)) == [orphan]
    assert blob_digests(blob_store) == set()

    version = _register(registry, tenants, adapter_id, make_adapter_dir(seed=6))
    assert version.number == 1  # the crashed attempt used no number


def test_gc_never_deletes_a_referenced_blob(
    registry: Registry,
    blob_store: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
) -> None:
    adapter_id = _adapter(registry, tenants)
    kept = _register(registry, tenants, adapter_id, make_adapter_dir())
    orphan = blob_store.put_bytes(b"not referenced by any version")
    assert registry.gc(now=FAR_FUTURE) == [orphan.sha256]
    assert blob_digests(blob_store) == {kept.sha256}


def test_gc_racing_a_registration_of_the_same_bytes_never_leaves_a_dangling_row(
    database: Database,
    blob_store: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """An old orphan with the same content is reused by a registration; a GC that deletes it between the
    blob write and the row insert must not leave the row pointing at nothing."""

    collected: list[str] = []

    def gc_in_the_middle(ref: BlobRef) -> None:
        if not collected:  # the registration's own write; not the re-upload it then needs
            collected.extend(Registry(database, blob_store).gc(now=FAR_FUTURE))
            assert collected == [ref.sha256]

    registry = Registry(database, FaultyBlobs(blob_store, after_put_file=gc_in_the_middle))
    adapter_id = _adapter(registry, tenants)
    version = _register(registry, tenants, adapter_id, make_adapter_dir())
    assert blob_store.exists(version.sha256)
    registry.fetch_version(version=version, dest_dir=tmp_path / "out")


# --- the archive reader refuses anything but the two files ----------------------------------------------
def _tar(tmp_path: Path, entries: list[tuple[str, bytes, bytes]]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname, info.size = "/etc/passwd", 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    "entries",
    [
        [
            ("../adapter_config.json", tarfile.REGTYPE, b"{}"),
            ("adapter_model.safetensors", tarfile.REGTYPE, b""),
        ],
        [
            ("/tmp/adapter_config.json", tarfile.REGTYPE, b"{}"),
            ("adapter_model.safetensors", tarfile.REGTYPE, b""),
        ],
        [("adapter_config.json", tarfile.SYMTYPE, b""), ("adapter_model.safetensors", tarfile.REGTYPE, b"")],
        [
            ("adapter_config.json", tarfile.REGTYPE, b"{}"),
            ("adapter_model.safetensors", tarfile.REGTYPE, b""),
            ("adapter_model.bin", tarfile.REGTYPE, b""),
        ],
        [("adapter_config.json", tarfile.REGTYPE, b"{}")],
    ],
    ids=["dotdot", "absolute", "symlink", "extra-file", "missing-file"],
)
def test_unpack_refuses_unexpected_entries(tmp_path: Path, entries: list[tuple[str, bytes, bytes]]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(AdapterFormatError):
        unpack_adapter_archive(archive=_tar(tmp_path, entries), dest_dir=dest)
    assert list(dest.iterdir()) == []


def test_unpack_refuses_bytes_that_are_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00not a tar archive" * 100)
    with pytest.raises(AdapterFormatError):
        unpack_adapter_archive(archive=junk, dest_dir=tmp_path)
