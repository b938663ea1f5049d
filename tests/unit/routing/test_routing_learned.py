"""Learned gates as versions: safetensors files, the ``gate`` adapter, registry round trips, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from routing_helpers import World, add_live_version, write_adapter_dir
from safetensors import safe_open
from safetensors.torch import save_file

from lorafleet.errors import AdapterFormatError, BackboneMismatchError, NonFiniteError, ValidationError
from lorafleet.registry import Registry
from lorafleet.routing import ExpertSet, GateSpec, build_gate, resolve_user_experts, set_gate_spec
from lorafleet.routing.experts import gate_adapter_id
from lorafleet.routing.learned import (
    GateArch,
    GateNetwork,
    GateTrainingConfig,
    LearnedGateModel,
    TrainedGate,
    load_learned_gate,
    load_learned_gate_file,
    register_learned_gate,
    save_learned_gate,
)
from lorafleet.store.sql.database import Database


def _model(ids: tuple[int, ...], *, arch: GateArch = "mlp", seed: int = 0) -> LearnedGateModel:
    torch.manual_seed(seed)
    network = GateNetwork(hidden_size=2, n_classes=len(ids), arch=arch, width=5)
    with torch.no_grad():
        network.mean.copy_(torch.tensor([0.1, -0.2]))
        network.scale.copy_(torch.tensor([0.5, 2.0]))
    return LearnedGateModel(network, ids, tuple(f"n{i}" for i in ids), 2, arch, 5, "fp-digest")


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_gate_file_round_trips_exactly(tmp_path: Path, arch: GateArch) -> None:
    model = _model((5, 9), arch=arch)
    path = save_learned_gate(model, tmp_path / "gate.safetensors")
    loaded = load_learned_gate_file(path, expected_fingerprint="fp-digest")
    assert (loaded.class_adapter_ids, loaded.class_names, loaded.arch) == ((5, 9), ("n5", "n9"), arch)
    x = torch.randn(4, 2)
    assert torch.equal(loaded.logits(x), model.logits(x))
    with pytest.raises(BackboneMismatchError):
        load_learned_gate_file(path, expected_fingerprint="another-backbone")


def test_gate_files_that_are_not_gates_or_not_finite_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(AdapterFormatError):
        load_learned_gate_file(plain)
    path = save_learned_gate(_model((1, 2)), tmp_path / "gate.safetensors")
    state = _model((1, 2)).network.state_dict()
    state["mean"] = torch.tensor([float("nan"), 0.0])
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    with pytest.raises(NonFiniteError):
        load_learned_gate_file(path)


def _two_member_bank(registry: Registry, database: Database, world: World, tmp: Path) -> ExpertSet:
    for i, name in enumerate(("a", "b")):
        adapter = registry.create_adapter(
            tenant_id=world.a, owner_user_id=world.alice, name=name, target_config={}
        )
        add_live_version(registry, tmp, tenant_id=world.a, adapter_id=adapter.id, seed=i, key=(1.0, float(i)))
    return resolve_user_experts(database, tenant_id=world.a, user_external_id="alice")


def test_a_registered_gate_is_a_live_version_of_the_users_gate_adapter(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    bank = _two_member_bank(registry, database, world, tmp_path)
    ids = tuple(m.adapter_id for m in bank.members)
    trained = TrainedGate(_model(ids), {"holdout_accuracy": 1.0}, GateTrainingConfig(), (1, 2))
    version = register_learned_gate(
        registry, database, user_bank=bank, trained=trained, base_fingerprint="fp", actor="trainer"
    )
    gate_adapter = gate_adapter_id(database, tenant_id=world.a, user_id=world.alice)
    assert version.adapter_id == gate_adapter and (version.rank, version.target_modules) == (0, ())
    assert version.training_config["class_adapter_ids"] == list(ids)
    assert registry.alias_history(tenant_id=world.a, adapter_id=version.adapter_id)[0].actor == "trainer"

    after = resolve_user_experts(database, tenant_id=world.a, user_external_id="alice")
    assert [m.adapter_name for m in after.members] == ["a", "b"]  # the gate adapter is not a member
    assert after.gate == GateSpec(kind="learned", learned_version_id=version.id)  # used when present
    assert after.revision != bank.revision

    def loader(version_id: int) -> LearnedGateModel:
        return load_learned_gate(
            registry, tenant_id=world.a, version_id=version_id, expected_fingerprint="fp-digest"
        )

    gate = build_gate(after.gate, load_learned=loader)
    x = torch.randn(3, 2)
    assert gate.decide(after, x) == build_gate(after.gate, load_learned=lambda _: trained.model).decide(
        after, x
    )

    second = register_learned_gate(
        registry, database, user_bank=after, trained=trained, base_fingerprint="fp", actor="t", promote=False
    )
    assert (
        second.number == 2
        and resolve_user_experts(database, tenant_id=world.a, user_external_id="alice").gate == after.gate
    )
    set_gate_spec(  # the tenant may pin an older gate version
        database,
        tenant_id=world.a,
        user_external_id="alice",
        spec=GateSpec(kind="learned", learned_version_id=second.id),
        actor="admin",
    )
    assert (
        resolve_user_experts(database, tenant_id=world.a, user_external_id="alice").gate.learned_version_id
        == second.id
    )


def test_gate_and_lora_versions_cannot_be_mixed_up(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    lora = registry.create_adapter(tenant_id=world.a, owner_user_id=world.alice, name="a", target_config={})
    gate = gate_adapter_id(database, tenant_id=world.a, user_id=world.alice, create=True)
    assert gate is not None
    gate_file = save_learned_gate(_model((1, 2)), tmp_path / "gate.safetensors")
    with pytest.raises(ValidationError):
        registry.register_file_version(
            tenant_id=world.a, adapter_id=lora.id, weights_file=gate_file, base_fingerprint="fp"
        )
    with pytest.raises(ValidationError):
        registry.register_version(
            tenant_id=world.a,
            adapter_id=gate,
            adapter_dir=write_adapter_dir(tmp_path / "peft"),
            base_fingerprint="fp",
        )
    poisoned = tmp_path / "poisoned.safetensors"
    save_file({"w": torch.tensor([float("inf")])}, str(poisoned))
    with pytest.raises(NonFiniteError):
        registry.register_file_version(
            tenant_id=world.a, adapter_id=gate, weights_file=poisoned, base_fingerprint="fp"
        )
    assert registry.list_versions(tenant_id=world.a, adapter_id=gate) == []
    version = registry.register_file_version(
        tenant_id=world.a, adapter_id=gate, weights_file=gate_file, base_fingerprint="fp"
    )
    fetched = registry.fetch_file_version(version=version, dest=tmp_path / "out" / "g.safetensors")
    assert fetched.read_bytes() == gate_file.read_bytes()
    later = datetime.now(UTC) + timedelta(days=30)
    assert registry.gc(now=later) == []  # the gate's blob is referenced by its version row, so it is kept
