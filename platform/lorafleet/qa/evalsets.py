"""The rows of the QA matrix: holdouts read from the feedback a version was trained on, and the probe set.

- A user's (personal) adapter: the user's holdout, i.e. every feedback record of the user up to the version's
  watermark (the newest record its training job saw), split by the production rule (``build_dataset``: by
  content hash, so a record is holdout on every machine and in every job). Holdout records are never trained
  on, so the set measures generalisation, and a later version is scored on the same records plus newer ones.
- A shared task adapter: the holdout part of the records its version's dataset snapshot lists; a version
  without a snapshot (an import) is scored on the holdout of all the task's feedback, when the task has any
  (else the row is empty and the runner judges the import by its other rules).
- The probe set (``lorafleet.qa.probe``).

The split uses the version's own training config (holdout fraction, rating threshold); every set is capped at
``policy.max_examples_per_set`` examples (``lorafleet.qa.sampling.cap_examples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.domain import AdapterVersion, FeedbackRecord
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.probe import probe_examples
from lorafleet.qa.results import PROBE, RowInfo, RowKind
from lorafleet.qa.sampling import cap_examples
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import get_snapshot
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, build_dataset

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank
    from lorafleet.backbone import Backbone


@dataclass(frozen=True)
class EvalSet:
    """One row: the examples scored (capped) out of ``total`` available."""

    name: str
    kind: RowKind
    examples: tuple[Example, ...]
    total: int
    adapter_id: int | None = None
    own: bool = False
    #: where the examples came from: ``holdout`` (feedback), ``import-examples`` (an import's own), ``probe``
    source: str = "holdout"

    def info(self) -> RowInfo:
        return RowInfo(self.name, self.kind, len(self.examples), self.total, self.adapter_id, self.own)


@dataclass(frozen=True)
class VersionFeedback:
    """A version and whose feedback it was trained on: its tenant's, and its owner's (None: a task adapter)."""

    tenant_id: int
    version: AdapterVersion
    owner_user_id: int | None


def training_config_of(version: AdapterVersion) -> TrainingConfig:
    """The version's training config (unknown keys such as ``backbone`` dropped), or the defaults."""
    known = set(TrainingConfig.model_fields)
    return TrainingConfig.from_mapping({k: v for k, v in version.training_config.items() if k in known})


def watermark_of(db: Database, version: AdapterVersion) -> int | None:
    """The newest feedback id the version's job trained through (None: no snapshot, use all feedback)."""
    if version.dataset_snapshot_id is None:
        return None
    snapshot = get_snapshot(db, snapshot_id=version.dataset_snapshot_id)
    details: dict[str, Any] = snapshot.details
    mark = details.get("watermark", snapshot.max_record_id)
    return None if mark is None else int(mark)


def version_records(db: Database, source: VersionFeedback) -> list[FeedbackRecord]:
    """The feedback a version's holdout is drawn from (see the module docstring)."""
    tenant_id, version = source.tenant_id, source.version
    repo = QARepository(dialect=db.dialect)
    if source.owner_user_id is not None:
        through = watermark_of(db, version)
        return db.run(repo.user_records, user_id=source.owner_user_id, through_id=through)
    if version.dataset_snapshot_id is None:
        with db.unit_of_work():
            subject = db.run(repo.task_subject_user_id, tenant_id=tenant_id, adapter_id=version.adapter_id)
            return [] if subject is None else db.run(repo.user_records, user_id=subject, through_id=None)
    snapshot = get_snapshot(db, snapshot_id=version.dataset_snapshot_id)
    return db.run(repo.records_by_ids, tenant_id=tenant_id, record_ids=list(snapshot.record_ids or ()))


def training_prompts(db: Database, *, tenant_id: int, version: AdapterVersion) -> list[str]:
    """The prompts a version trained on (its snapshot's training split), for a routing key."""
    if version.dataset_snapshot_id is None:
        return []
    snapshot = get_snapshot(db, snapshot_id=version.dataset_snapshot_id)
    records = db.run(
        QARepository(dialect=db.dialect).records_by_ids,
        tenant_id=tenant_id,
        record_ids=list(snapshot.record_ids or ()),
    )
    return [e.prompt for e in build_dataset(records, config=training_config_of(version)).train]


def holdout_set(
    db: Database, source: VersionFeedback, *, name: str, adapter_id: int, own: bool, policy: QAPolicy
) -> EvalSet:
    """A version's holdout as a capped evaluation set: an import's own examples when it carries them (all of them
    are held out: it was not trained on them here), else the holdout of its feedback."""
    evidence = source.version.training_config.get("evidence")
    if evidence:
        examples = [Example(i + 1, e["prompt"], e["expected"], "sft") for i, e in enumerate(evidence)]
        kept = cap_examples(examples, limit=policy.max_examples_per_set, seed=policy.sample_seed, name=name)
        return EvalSet(name, "task-holdout", tuple(kept), len(examples), adapter_id, own, "import-examples")
    holdout = build_dataset(version_records(db, source), config=training_config_of(source.version)).holdout
    kept = cap_examples(holdout, limit=policy.max_examples_per_set, seed=policy.sample_seed, name=name)
    kind: RowKind = "user-holdout" if source.owner_user_id is not None else "task-holdout"
    return EvalSet(name, kind, tuple(kept), len(holdout), adapter_id, own)


def training_set(db: Database, source: VersionFeedback, *, policy: QAPolicy) -> EvalSet:
    """Up to ``policy.training_answers`` examples of the training split of the feedback the version's job trained
    on (the records its holdout is drawn from, split by the same rule), for the ``training-answers`` rule. Empty for
    a version without a dataset snapshot (an import: it was not trained here)."""
    name = "training"
    if policy.training_answers == 0 or source.version.dataset_snapshot_id is None:
        return EvalSet(name, "training", (), 0)
    train = build_dataset(version_records(db, source), config=training_config_of(source.version)).train
    kept = cap_examples(train, limit=policy.training_answers, seed=policy.sample_seed, name=name)
    return EvalSet(name, "training", tuple(kept), len(train), source="training")


def probe_set(policy: QAPolicy, backbone: Backbone, bank: AdapterBank | None = None) -> EvalSet:
    """The shipped probe prompts with the base model's answers on ``backbone`` (``lorafleet.qa.probe``)."""
    examples = probe_examples(backbone, policy.probe_size, bank=bank)
    return EvalSet(PROBE, "probe", tuple(examples), len(examples), source="probe")


__all__ = [
    "EvalSet",
    "VersionFeedback",
    "holdout_set",
    "probe_set",
    "training_config_of",
    "training_prompts",
    "training_set",
    "version_records",
    "watermark_of",
]
