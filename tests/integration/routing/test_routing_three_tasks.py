"""A user with three adapters trained on three synthetic tasks: held-out prompts go to the right adapter.

The tiny backbone (fp32, random init, byte-level tokenizer) is the real one; the adapters are trained briefly
with the project's trainer, registered with their routing keys (two personal, one a tenant task adapter the user
is enrolled in), and the user's experts is resolved from the database, as serving does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests.unit.routing.routing_helpers import World

from lorafleet.adapters import AdapterBank, SlotPlan, inject_bank, save_slot
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone
from lorafleet.registry import Registry
from lorafleet.routing import (
    CentroidGate,
    Expert,
    ExpertSet,
    GateDecision,
    GateSpec,
    build_gate,
    embed_prompts,
    enrol,
    plan_from_decisions,
    resolve_user_experts,
    routing_key,
)
from lorafleet.routing.experts import experts_revision
from lorafleet.routing.learned import (
    LearnedGateModel,
    load_learned_gate,
    register_learned_gate,
    train_learned_gate,
)
from lorafleet.store.sql.database import Database
from lorafleet.training import Example, SlotTraining, TrainingConfig, train_slots
from lorafleet.training.metrics import score_examples, summarize
from lorafleet.training.synthetic_routing import TASKS, three_tasks

MAX_SEQ = 64


@dataclass(frozen=True)
class TrainedTasks:
    backbone: Backbone
    bank: AdapterBank
    data: dict[str, tuple[list[Example], list[Example]]]
    dirs: dict[str, Path]
    keys: dict[str, tuple[float, ...]]
    #: held-out prompts of every task (task order), their tasks and pooled embeddings ``[n, hidden]``
    holdout: list[Example]
    expected: list[str]
    embeddings: torch.Tensor


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedTasks:
    """Three slots trained briefly (slot i = task i), saved as PEFT folders, with their routing keys."""
    backbone = load_backbone(
        build_tiny_backbone(tmp_path_factory.mktemp("routing-data")), quantization="fp32", device="cpu"
    )
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=3, max_rank=4)
    config = TrainingConfig(
        rank=4, alpha=8, dropout=0.0, learning_rate=1e-2, max_steps=8, batch_size=4, max_seq_len=MAX_SEQ
    )
    data = three_tasks(n_train=48, n_holdout=20)
    tasks = []
    for slot, task in enumerate(TASKS):
        bank.init_slot(slot, config.slot_config(name=task), seed=slot)
        tasks.append(SlotTraining(slot=slot, key=task, train=data[task][0], holdout=()))
    train_slots(bank, backbone.tokenizer, tasks, config)
    out = tmp_path_factory.mktemp("routing-adapters")
    dirs = {task: save_slot(bank, slot, out / task).directory for slot, task in enumerate(TASKS)}
    keys = {task: routing_key(backbone, bank, [e.prompt for e in data[task][0]]) for task in TASKS}
    holdout = [e for task in TASKS for e in data[task][1]]
    expected = [task for task in TASKS for _ in data[task][1]]
    embeddings = embed_prompts(backbone, bank, [e.prompt for e in holdout])
    return TrainedTasks(backbone, bank, data, dirs, keys, holdout, expected, embeddings)


def _register(registry: Registry, database: Database, world: World, trained: TrainedTasks) -> ExpertSet:
    """pig-latin and reverse: alice's own adapters; favourite: a task adapter she is enrolled in."""
    for task in TASKS:
        owner = None if task == "favourite" else world.alice
        adapter = registry.create_adapter(tenant_id=world.a, owner_user_id=owner, name=task, target_config={})
        version = registry.register_version(
            tenant_id=world.a,
            adapter_id=adapter.id,
            adapter_dir=trained.dirs[task],
            base_fingerprint=trained.backbone.fingerprint.digest,
            routing_key=trained.keys[task],
        )
        registry.promote(tenant_id=world.a, adapter_id=adapter.id, number=version.number, actor="trainer")
    enrol(database, tenant_id=world.a, user_external_id="alice", task_name="favourite", actor="admin")
    return resolve_user_experts(database, tenant_id=world.a, user_external_id="alice")


def _accuracy(user_bank: ExpertSet, decisions: list[GateDecision], expected: list[str]) -> float:
    chosen = [user_bank.members[d.routes[0][0]].adapter_name if d.routes else None for d in decisions]
    return sum(c == e for c, e in zip(chosen, expected, strict=True)) / len(expected)


def test_held_out_prompts_are_routed_to_their_tasks_adapter(
    database: Database, registry: Registry, world: World, trained: TrainedTasks
) -> None:
    user_bank = _register(registry, database, world, trained)
    assert sorted(m.adapter_name for m in user_bank.members) == sorted(TASKS)
    expected, embeddings = trained.expected, trained.embeddings

    centroid = build_gate(user_bank.gate).decide(user_bank, embeddings)
    assert user_bank.gate.kind == "centroid" and _accuracy(user_bank, centroid, expected) >= 0.95
    assert all(len(d.routes) == 2 and d.routes[0][1] > 0.5 for d in centroid)

    prompts = {m.adapter_id: [e.prompt for e in trained.data[m.adapter_name][0]] for m in user_bank.members}
    gate = train_learned_gate(trained.backbone, trained.bank, user_bank=user_bank, prompts=prompts)
    assert gate.metrics["holdout_accuracy"] >= 0.95
    register_learned_gate(
        registry, database, user_bank=user_bank, trained=gate, base_fingerprint="tiny", actor="trainer"
    )
    learned_bank = resolve_user_experts(database, tenant_id=world.a, user_external_id="alice")
    assert learned_bank.gate.kind == "learned" and learned_bank.members == user_bank.members

    def loader(version_id: int) -> LearnedGateModel:
        return load_learned_gate(
            registry, tenant_id=world.a, version_id=version_id, expected_fingerprint=trained.bank.fingerprint
        )

    learned = build_gate(learned_bank.gate, load_learned=loader).decide(learned_bank, embeddings)
    assert _accuracy(learned_bank, learned, expected) >= 0.95


def test_the_gated_mixture_is_within_5_percent_of_the_right_adapter(trained: TrainedTasks) -> None:
    """Decisions drive one batched forward over the bank; uniform averaging is clearly worse."""
    members = [
        Expert(slot + 1, task, "personal", slot + 10, 1, "0" * 64, 0, 4, trained.keys[task])
        for slot, task in enumerate(TASKS)
    ]
    user_bank = ExpertSet(1, 1, "alice", tuple(members), GateSpec(), experts_revision(members, GateSpec()))
    decisions = CentroidGate().decide(user_bank, trained.embeddings)
    slot_of = list(range(len(TASKS)))  # member i is in slot i
    assert plan_from_decisions(decisions, [slot_of] * len(decisions)).batch_size == len(trained.holdout)

    def loss(routes: list[list[tuple[int, float]]]) -> float:
        tokenizer = trained.backbone.tokenizer
        return summarize(
            score_examples(trained.bank, tokenizer, trained.holdout, routes, max_seq_len=MAX_SEQ)
        ).loss

    gated = loss([d.to_slots(slot_of) for d in decisions])
    oracle = loss([[(TASKS.index(task), 1.0)] for task in trained.expected])
    uniform = loss([[(slot, 1 / 3) for slot in slot_of]] * len(trained.holdout))
    assert gated <= oracle * 1.05 and gated < uniform


def test_embeddings_depend_neither_on_padding_nor_on_the_adapters_in_use(trained: TrainedTasks) -> None:
    prompts = [e.prompt for e in trained.data["reverse"][1][:3]] + ["a much longer prompt " * 4]
    alone = torch.cat([embed_prompts(trained.backbone, trained.bank, [p]) for p in prompts])
    batched = embed_prompts(trained.backbone, trained.bank, prompts)
    assert torch.allclose(alone, batched, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(prompts)))
    with trained.bank.use(SlotPlan.single([0] * len(prompts))):  # the base model embeds, always
        assert torch.equal(embed_prompts(trained.backbone, trained.bank, prompts), batched)
