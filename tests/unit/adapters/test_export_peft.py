"""An exported version (``registry.export``) loads in PEFT's own ``AutoPeftModelForCausalLM`` and answers as the
bank does with that version in a slot (fp32 tiny backbone, max |Δlogits| <= 1e-5, as the PEFT-equivalence
tests); its config names a base PEFT accepts; and the archive imports back into lorafleet."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig, SlotPlan, inject_bank, load_slot_from_dir, save_slot
from lorafleet.backbone import Backbone
from lorafleet.config import SMOLLM2_BACKBONE, TINY_BACKBONE
from lorafleet.domain import AdapterVersion
from lorafleet.errors import InvalidStateError
from lorafleet.registry import Registry
from lorafleet.registry.export import (
    EXPORT_INFO_FILE,
    SMOLLM2_HF_ID,
    check_exportable,
    export_filename,
    export_version,
    peft_base_name,
)
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.adapter_import import ImportRequest, import_peft_adapter

TOL = 1e-5
QV = ["q_proj", "v_proj"]


def _registered(
    tmp_path: Path, db: Database, backbone: Backbone
) -> tuple[Registry, AdapterVersion, int, AdapterBank]:
    """A random rank-4 adapter saved from a bank slot and registered as version 1 of alice's ``personal``."""
    bank = inject_bank(backbone, target_modules=QV, n_slots=2, max_rank=8)
    bank.load_slot(0, random_lora_weights(bank, rank=4, seed=3, scale=0.2), SlotConfig(rank=4, alpha=8.0))
    saved = save_slot(bank, 0, tmp_path / "saved")
    registry = Registry(db, open_blob_store((tmp_path / "blobs").as_uri()))
    tenants = TenantRepository(db)
    tenant, _ = tenants.create_tenant(name="acme")
    user = tenants.get_or_create_user(tenant_id=tenant.id, external_id="alice")
    adapter = registry.create_adapter(
        tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={}
    )
    version = registry.register_version(
        tenant_id=tenant.id,
        adapter_id=adapter.id,
        adapter_dir=saved.directory,
        base_fingerprint=bank.fingerprint,
    )
    return registry, version, tenant.id, bank


def _unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive, mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    [folder] = list(dest.iterdir())
    return folder


def test_an_exported_version_loads_in_peft_and_equals_the_bank(
    tmp_path: Path,
    sqlite_database: Database,
    tiny_dir: Path,
    fp32_backbone: Backbone,
    input_ids: torch.Tensor,
) -> None:
    registry, version, _, bank = _registered(tmp_path, sqlite_database, fp32_backbone)
    exported = export_version(
        registry, version=version, adapter_name="personal", backbone=TINY_BACKBONE, dest_dir=tmp_path
    )
    assert exported.path == tmp_path / "personal-v1.tar.gz" and exported.version_sha256 == version.sha256
    folder = _unpack(exported.path, tmp_path / "unpacked")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_BACKBONE  # the marker: random weights only lorafleet has
    info = json.loads((folder / EXPORT_INFO_FILE).read_text())
    assert (
        info["backbone_fingerprint"] == version.base_fingerprint and info["version_sha256"] == version.sha256
    )

    # the documented step for builtin:tiny: point the config at a local save of the backbone
    config["base_model_name_or_path"] = str(tiny_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft_model.eval()

    load_slot_from_dir(bank, 1, registry.fetch_version(version=version, dest_dir=tmp_path / "fetched"))
    with torch.no_grad():
        with bank.use(SlotPlan.single([1] * input_ids.shape[0])):
            ours = fp32_backbone.model(input_ids=input_ids).logits
        with bank.base_only():
            base = fp32_backbone.model(input_ids=input_ids).logits
        theirs = peft_model(input_ids=input_ids).logits
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - base).abs().max().item() > 1e-2  # the adapter does change the output


def test_the_base_name_is_one_peft_accepts(
    tmp_path: Path, sqlite_database: Database, fp32_backbone: Backbone
) -> None:
    assert peft_base_name(SMOLLM2_BACKBONE) == SMOLLM2_HF_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base_name("/models/my-llama") == "/models/my-llama"  # a local folder names itself
    assert peft_base_name(TINY_BACKBONE) == TINY_BACKBONE
    registry, version, _, _ = _registered(tmp_path, sqlite_database, fp32_backbone)
    exported = export_version(
        registry, version=version, adapter_name="my adapter/ü", backbone=SMOLLM2_BACKBONE, dest_dir=tmp_path
    )
    assert exported.filename == export_filename("my adapter/ü", 1) == "my_adapter_-v1.tar.gz"
    folder = _unpack(exported.path, tmp_path / "unpacked")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HF_ID
    (tmp_path / "b").mkdir()
    again = export_version(
        registry,
        version=version,
        adapter_name="my adapter/ü",
        backbone=SMOLLM2_BACKBONE,
        dest_dir=tmp_path / "b",
    )
    assert again.archive_sha256 == exported.archive_sha256  # deterministic bytes


def test_a_corrupt_version_is_not_exported(
    tmp_path: Path, sqlite_database: Database, fp32_backbone: Backbone
) -> None:
    registry, version, tenant_id, _ = _registered(tmp_path, sqlite_database, fp32_backbone)
    corrupt = registry.mark_corrupt(tenant_id=tenant_id, adapter_id=version.adapter_id, version_id=version.id)
    with pytest.raises(InvalidStateError, match="corrupt"):
        check_exportable(corrupt)
    with pytest.raises(InvalidStateError):
        export_version(
            registry, version=corrupt, adapter_name="personal", backbone=TINY_BACKBONE, dest_dir=tmp_path
        )
    assert not (tmp_path / "personal-v1.tar.gz").exists()


def test_an_exported_archive_imports_back_with_the_same_weights(
    tmp_path: Path, sqlite_database: Database, fp32_backbone: Backbone
) -> None:
    registry, version, tenant_id, bank = _registered(tmp_path, sqlite_database, fp32_backbone)
    exported = export_version(
        registry, version=version, adapter_name="personal", backbone=TINY_BACKBONE, dest_dir=tmp_path
    )
    request = ImportRequest(
        tenant_id=tenant_id, task_name="copy", source=exported.path, example_prompts=["hello"], actor="test"
    )
    imported = import_peft_adapter(registry, request, backbone=fp32_backbone, bank=bank)
    back = registry.fetch_version(version=imported.version, dest_dir=tmp_path / "back")
    original = registry.fetch_version(version=version, dest_dir=tmp_path / "original")
    weights = "adapter_model.safetensors"
    assert (back / weights).read_bytes() == (original / weights).read_bytes()  # fingerprint metadata kept
    assert imported.version.base_fingerprint == version.base_fingerprint
