"""Helpers for the QA tests: a world with users and feedback, adapters trained through ``lorafleet.training``
(good, harmful, interfering), versions registered as candidates, and jobs run in-process."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters import AdapterBank, save_slot
from lorafleet.backbone import Backbone
from lorafleet.domain import AdapterVersion, AliasEvent, LineageRelation
from lorafleet.jobs import JobQueue, JobWorker
from lorafleet.registry import Registry, pack_adapter_archive
from lorafleet.routing.embeddings import routing_key
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import create_snapshot
from lorafleet.store.sql.registry_repository import NewVersion, RegistryRepository
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training import synthetic
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, build_dataset
from lorafleet.training.overrides import set_tenant_training
from lorafleet.training.resident import Resident
from lorafleet.training.trainer import SlotTraining, train_slots
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer
from lorafleet.workflows.feedback import ingest_feedback
from lorafleet.workflows.live_alias import promote_manually
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.qa_triggers import QA_JOB_KIND

#: enough training for the tiny model to actually answer its holdout (every linear module, 150 steps at 1e-2:
#: 6 of 8 round-one holdout answers right); the old 12 steps on two projections lowered the loss (5.7 -> 5.1)
#: while every answer stayed wrong, which the answer rule rightly rejects as no improvement. A continual round
#: needs a replayed old record per new one and enough new records (64 for a round two: 10 better, 0 worse on
#: its 25 holdout answers, p=0.001) to beat the live version; with 60 steps, half the replay and 16 new records
#: round two forgot round one without learning its own topics (F1 0.25 vs 0.42) and was rightly rejected
TINY_TRAINING: dict[str, Any] = {
    # the random-init tiny model's "answers" to general prompts are noise: no anchor rows on it
    "anchor_ratio": 0.0,
    "rank": 8,
    "alpha": 16.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "learning_rate": 1e-2,
    "max_steps": 150,
    "batch_size": 8,
    "max_seq_len": 64,
    "holdout_fraction": 0.3,
    "replay_ratio": 1.0,
    "dropout": 0.0,
    "seed": 0,
}


@dataclass
class World:
    """One tenant and the parts QA runs on (in-process)."""

    db: Database
    registry: Registry
    backbone: Backbone
    bank: AdapterBank
    tenant_id: int
    config: TrainingConfig

    @property
    def resident(self) -> Resident:
        """The stores and the model the job handlers run on."""
        return Resident(self.db, self.registry, self.backbone, self.bank)

    def user_id(self, external_id: str) -> int:
        return TenantRepository(self.db).get_user(tenant_id=self.tenant_id, external_id=external_id).id

    def personal(self, external_id: str) -> int:
        found = self.registry.find_adapter(
            tenant_id=self.tenant_id, owner_user_id=self.user_id(external_id), name=PERSONAL_ADAPTER
        )
        assert found is not None
        return found.id

    def promote(self, **how: Any) -> AliasEvent:
        """A person's promote in this tenant: ``promote_manually`` with ``how`` (adapter, number, actor, reason,
        force), under the promote rule ``qa`` unless ``how`` names another."""
        how.setdefault("promote_rule", "qa")
        return promote_manually(self.db, self.registry, tenant_id=self.tenant_id, **how)


def make_world(db: Database, registry: Registry, backbone: Backbone, bank: AdapterBank) -> World:
    tenant_id = TenantRepository(db).create_tenant(name="acme")[0].id
    set_tenant_training(db, tenant_id=tenant_id, overrides=TINY_TRAINING)  # the config its jobs carry
    return World(db, registry, backbone, bank, tenant_id, TrainingConfig(**TINY_TRAINING))


def feed(world: World, user: str, *, round: int = 1, n_records: int = 24, seed: int = 0) -> list[int]:
    """Ingest a user's synthetic records (their true preferences); the new ids."""
    records = synthetic.make_user_records(user, round=round, n_records=n_records, seed=seed)
    return ingest_feedback(world.db, tenant_id=world.tenant_id, user_external_id=user, records=records).ids


def worker(
    world: World, runner: QARunner, *, trainer: ContinualTrainer | None = None, name: str = "w"
) -> JobWorker:
    handlers: dict[str, Any] = {QA_JOB_KIND: runner.run_job}
    if trainer is not None:
        handlers["train"] = trainer.run_job
    return JobWorker(JobQueue(world.db), worker_id=name, handlers=handlers, lease_seconds=30.0)


def qa_trainer(world: World) -> ContinualTrainer:
    """The continual trainer with the ``qa`` promote rule (each new version queues its QA job)."""
    return ContinualTrainer(world.resident, config=world.config, promote_rule="qa")


# --- adapters trained outside the continual loop ------------------------------------------------------------
def train_adapter(
    world: World, examples: Sequence[Example], *, work: Path, seed: int = 0, steps: int | None = None
) -> Path:
    """Train a fresh slot on ``examples`` with ``lorafleet.training`` (the world's steps unless ``steps``) and
    save it as a PEFT folder."""
    bank = world.bank
    config = world.config.with_changes(max_steps=steps or world.config.max_steps, seed=seed)
    slot = bank.free_slot()
    bank.init_slot(slot, config.slot_config(backbone_fingerprint=bank.fingerprint), seed=seed)
    try:
        train_slots(
            bank, world.backbone.tokenizer, [SlotTraining(slot, f"adhoc-{seed}", list(examples), [])], config
        )
        return save_slot(bank, slot, work).directory
    finally:
        bank.evict_slot(slot)


def adversarial(examples: Sequence[Example], *, other_user: str = "mallory") -> list[Example]:
    """The same prompts answered with another user's preferences: poisoned feedback (a harmful training set)."""
    wrong = synthetic.user_preferences(other_user)
    return [
        Example(e.record_id, e.prompt, wrong[synthetic.topic_of(e.prompt)] + "\n", e.kind) for e in examples
    ]


def user_examples(world: World, user: str) -> list[Example]:
    """A user's training split, as the trainer builds it from their stored feedback."""
    from lorafleet.workflows.feedback import list_feedback

    records = list_feedback(world.db, tenant_id=world.tenant_id, user_external_id=user, limit=1000)
    return list(build_dataset(records, config=world.config).train)


def register_candidate(
    world: World,
    *,
    adapter_id: int,
    folder: Path,
    record_ids: Sequence[int],
    user_id: int | None,
    parent: AdapterVersion | None = None,
    key: tuple[float, ...] | None = None,
    fingerprint: str | None = None,
) -> AdapterVersion:
    """Register a PEFT folder as a candidate with a dataset snapshot of ``record_ids`` (its holdout source)."""
    snapshot = create_snapshot(
        world.db, user_id=user_id, record_ids=record_ids, details={"watermark": max(record_ids)}
    )
    parents: list[tuple[int, LineageRelation]] = [] if parent is None else [(parent.id, "continued-from")]
    return world.registry.register_version(
        tenant_id=world.tenant_id,
        adapter_id=adapter_id,
        adapter_dir=folder,
        base_fingerprint=fingerprint or world.backbone.fingerprint.digest,
        parents=parents,
        training_config=world.config.model_dump(),
        dataset_snapshot_id=snapshot.id,
        routing_key=key,
    )


def key_of(world: World, examples: Sequence[Example]) -> tuple[float, ...]:
    return routing_key(world.backbone, world.bank, [e.prompt for e in examples])


def register_unchecked(
    world: World, *, adapter_id: int, folder: Path, work: Path, base: AdapterVersion
) -> int:
    """Insert a version whose weights hold a NaN, bypassing the registry's checks (as a version written by an
    older release, or a corrupted import, would be): QA must refuse it before evaluating."""
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    metadata = _metadata(weights)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata=metadata)
    from lorafleet.registry.peft_format import inspect_adapter_dir

    archive = pack_adapter_archive(files=inspect_adapter_dir(folder), dest=work / "bad.tar")
    ref = world.registry.blobs.put_file(archive)
    repo = RegistryRepository(dialect=world.db.dialect)
    new = NewVersion(
        blob_uri=ref.uri,
        sha256=ref.sha256,
        size_bytes=ref.size,
        base_fingerprint=base.base_fingerprint,
        rank=base.rank,
        target_modules=base.target_modules,
        training_config=base.training_config,
        metrics={},
        status="candidate",
        job_id=None,
        dataset_snapshot_id=base.dataset_snapshot_id,
        parents=((base.id, "continued-from"),),
    )
    with world.db.session() as s:
        number = repo.next_version_number(s, tenant_id=world.tenant_id, adapter_id=adapter_id)
        return repo.insert_version(s, adapter_id=adapter_id, number=number, new=new).id


def _metadata(weights: Path) -> dict[str, str]:
    from lorafleet.registry.peft_format import read_safetensors_header

    meta = read_safetensors_header(weights).get("__metadata__") or {}
    return {str(k): str(v) for k, v in dict(meta).items()}


def archive_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def scale_weights(folder: Path, factor: float) -> Path:
    """Multiply every lora_B by ``factor`` in place (a diverged update, for the norm check)."""
    weights = folder / "adapter_model.safetensors"
    tensors = {k: (v * factor if ".lora_B." in k else v) for k, v in load_file(str(weights)).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata=_metadata(weights))
    return folder


__all__ = ["TINY_TRAINING", "World", "torch"]
