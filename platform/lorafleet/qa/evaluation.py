"""Evaluating one version (the *subject*) in the combinations it is served in: sanity first, then the matrix.

The subject (an ``EvaluatedVersion``; not to be mixed up with ``lorafleet.domain.subject.Subject``, whose data a
job trains on) is a candidate (compared with the previous live version) or, in a recheck, a live version or an
earlier one tried for a rollback (no previous). Nothing is written here except slots of the host's bank, which
are evicted before returning.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.adapters.dense import dense_budget, dense_views
from lorafleet.adapters.prefix import FrozenPrefix
from lorafleet.backbone.chat import general_side_on
from lorafleet.domain import Adapter, AdapterVersion, QAKind
from lorafleet.errors import LorafleetError
from lorafleet.qa.columns import (
    CANDIDATE_HANDLE,
    PREVIOUS_HANDLE,
    gated_experts,
    matrix_columns,
    member_handle,
    version_member,
)
from lorafleet.qa.evalsets import (
    EvalSet,
    VersionFeedback,
    holdout_set,
    probe_set,
    training_config_of,
    training_set,
)
from lorafleet.qa.matrix import GatedExperts, SlotLoader, embed_sets, evaluate_matrix, gate_traffic
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.probe import PROBE_VERSION, answers_digest, probe_digest, probe_epsilon_for, probe_examples
from lorafleet.qa.results import BASE, CANDIDATE, PREVIOUS, Matrix
from lorafleet.qa.sampling import MemberSample, member_budget, member_label, sample_members
from lorafleet.qa.sanity import SanityResult, check_adapter
from lorafleet.routing.embeddings import common_direction
from lorafleet.routing.gates import build_gate
from lorafleet.routing.learned import load_learned_gate
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.training.general_prompts import general_exemplars
from lorafleet.training.resident import Resident

if TYPE_CHECKING:
    from lorafleet.routing.experts import Expert, ExpertSet
    from lorafleet.routing.gates import Gate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluatedVersion:
    """The version under evaluation, what it replaces, and the bank it is served in: its owner's for a personal
    adapter; for a task adapter None (evaluated alone) or one enrolled user's experts."""

    kind: QAKind
    tenant_id: int
    adapter: Adapter
    version: AdapterVersion
    previous: AdapterVersion | None
    user_bank: ExpertSet | None
    routing_key: tuple[float, ...] | None = None
    routing_claim: tuple[float, ...] | None = None

    @property
    def label(self) -> str:
        return f"{'task' if self.adapter.is_task_adapter else 'personal'}:{self.adapter.name}"

    @property
    def feedback(self) -> VersionFeedback:
        """The version, read with its adapter owner's feedback (a task adapter's: the task's)."""
        return VersionFeedback(self.tenant_id, self.version, self.adapter.owner_user_id)


@dataclass(frozen=True)
class Evaluation:
    """Sanity, the matrix (None when sanity failed) and how the bank was evaluated."""

    sanity: SanityResult
    matrix: Matrix | None
    bank: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Evaluator:
    """Builds and evaluates a subject's matrix on the resident backbone and bank."""

    def __init__(
        self,
        resident: Resident,
        *,
        policy: QAPolicy,
        work_dir: Path | None = None,
        prefix: FrozenPrefix | None = None,
        general_prompts: Sequence[str] = (),
        general_to_base: bool | None = False,
    ) -> None:
        """Without ``prefix`` one is made for the bank: every column of a matrix shares the frozen layers.
        ``general_prompts``, ``general_to_base``: as serving's (``serving.factory.build_engine``), so QA gates as
        serving does."""
        self.db, self.registry = resident.db, resident.registry
        self.backbone, self.bank = resident.backbone, resident.bank
        # a probe bound left to the backbone (``epsilon_probe=None``) is filled in here, so reports record it
        self.policy, self.work_dir = policy.for_probe_bound(probe_epsilon_for(self.backbone.path)), work_dir
        self.general_prompts = tuple(general_prompts)
        self.general_to_base = general_side_on(general_to_base, self.backbone.tokenizer)
        self.prefix = prefix or resident.frozen_prefix()

    def own_set(self, subject: EvaluatedVersion) -> EvalSet:
        """The subject's own holdout (the user's, or the task adapter's)."""
        return holdout_set(
            self.db,
            subject.feedback,
            name=f"holdout:{subject.label}",
            adapter_id=subject.adapter.id,
            own=True,
            policy=self.policy,
        )

    def training_set(self, subject: EvaluatedVersion) -> EvalSet:
        """Examples of the feedback the subject's job trained on, for the ``training-answers`` rule."""
        return training_set(self.db, subject.feedback, policy=self.policy)

    def evaluate(self, subject: EvaluatedVersion, *, own: EvalSet, answers: bool = True) -> Evaluation:
        """Sanity checks, then (if they pass) every configuration on every evaluation set. A candidate's own
        holdout is also answered greedily by the candidate and the previous live version (the base model when
        there is none), and examples of its training split by the candidate alone, unless ``answers`` is False
        (the same candidate in another bank: already answered)."""
        started = time.monotonic()
        free = self.bank.n_slots - len(self.bank.occupied())
        with tempfile.TemporaryDirectory(prefix="lorafleet-qa-", dir=self.work_dir) as tmp:
            work = Path(tmp)
            folder = self.registry.fetch_version(version=subject.version, dest_dir=work / "subject")
            sanity = check_adapter(
                folder, version=subject.version, adapter=subject.adapter, bank=self.bank, policy=self.policy
            )
            if not sanity.passed:
                return Evaluation(sanity, None, {}, time.monotonic() - started)
            with SlotLoader(bank=self.bank, registry=self.registry, work=work) as loader:
                loader.load(CANDIDATE_HANDLE, subject.version, folder=folder)
                notes: dict[str, Any] = {}
                has_previous = self._load_previous(loader, subject, notes)
                # on CPU, dense copies of the 4-bit layers for the job: scoring and greedy samples run small
                # batches, where bitsandbytes' per-call dequantisation is most of the time (same numbers)
                with dense_views(
                    self.backbone.model, from_layer=0, budget_bytes=dense_budget(self.bank.device)
                ):
                    pair, training = None, None
                    if answers and subject.kind == QAKind.CANDIDATE:
                        pair = (CANDIDATE, PREVIOUS if has_previous else BASE)
                        training = self.training_set(subject)
                    matrix = self._matrix(subject, own, loader, has_previous, free, notes, pair, training)
        notes["probe"] = {
            "version": PROBE_VERSION,
            "sha256": probe_digest(self.policy.probe_size),
            "answers_sha256": answers_digest(
                probe_examples(self.backbone, self.policy.probe_size, bank=self.bank)
            ),
        }
        return Evaluation(sanity, matrix, notes, time.monotonic() - started)

    def _load_previous(self, loader: SlotLoader, subject: EvaluatedVersion, notes: dict[str, Any]) -> bool:
        if subject.previous is None:
            return False
        try:
            loader.load(PREVIOUS_HANDLE, subject.previous)
        except LorafleetError as exc:  # e.g. trained on another backbone: compared as if absent, and said so
            notes["previous_unloadable"] = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def _matrix(
        self,
        subject: EvaluatedVersion,
        own: EvalSet,
        loader: SlotLoader,
        has_previous: bool,
        free: int,
        notes: dict[str, Any],
        answers: tuple[str, str] | None,
        training: EvalSet | None = None,
    ) -> Matrix:
        sets: list[EvalSet] = [own]
        if subject.user_bank is None:
            columns = matrix_columns(
                has_previous=has_previous, gated_previous=None, gated_candidate=None, others=[]
            )
        else:
            user_bank = subject.user_bank
            gate = self._gate(user_bank)
            sample = self._sample(
                subject,
                own,
                gate,
                budget=member_budget(max_members=self.policy.max_bank_members, free_slots=free),
            )
            others = self._load_members(loader, subject, sample.sampled, notes)
            sets += [self._member_set(subject, m) for m in others]
            candidate = self._member(subject, subject.version, subject.routing_key, subject.routing_claim)
            previous = None
            if has_previous and subject.previous is not None:
                previous = self._member(subject, subject.previous, *self._routing(subject.previous))

            def gated(member: Expert | None, handle: str) -> GatedExperts:
                """The user's experts as the gate serves it, with ``member`` loaded under ``handle``."""
                return gated_experts(
                    user_bank, gate=gate, subject=member, subject_handle=handle, others=others
                )

            columns = matrix_columns(
                has_previous=has_previous,
                gated_previous=gated(previous, PREVIOUS_HANDLE) if subject.kind == QAKind.CANDIDATE else None,
                gated_candidate=gated(candidate, CANDIDATE_HANDLE),
                others=others,
            )
            notes.update(_bank_notes(user_bank, sample))
        sets.append(probe_set(self.policy, self.backbone, self.bank))
        return evaluate_matrix(
            backbone=self.backbone,
            bank=self.bank,
            sets=sets,
            columns=columns,
            slots=loader.slots,
            policy=self.policy,
            prefix=self.prefix,
            answers=answers,
            answer_source=own.source,
            preference_beta=_preference_beta(subject),
            training=training,
        )

    # --- the bank -----------------------------------------------------------------------------------------
    def _gate(self, user_bank: ExpertSet) -> Gate:
        def load(version_id: int) -> Any:
            return load_learned_gate(
                self.registry,
                tenant_id=user_bank.tenant_id,
                version_id=version_id,
                expected_fingerprint=self.bank.fingerprint,
            )

        # the gate serving builds (serving.factory.build_engine)
        if not self.general_prompts:
            return build_gate(user_bank.gate, load_learned=load)
        reference = general_exemplars(self.backbone, self.bank, self.general_prompts)
        return build_gate(
            user_bank.gate,
            load_learned=load,
            general=reference if self.general_to_base else None,
            common=common_direction(reference),
        )

    def _sample(self, subject: EvaluatedVersion, own: EvalSet, gate: Gate, *, budget: int) -> MemberSample:
        """The other members to evaluate (``lorafleet.qa.sampling``): gate traffic first when over budget."""
        assert subject.user_bank is not None
        others = [m for m in subject.user_bank.members if m.adapter_id != subject.adapter.id]
        traffic: dict[int, float] = {}
        if len(others) > budget and own.examples:
            candidate = self._member(subject, subject.version, subject.routing_key, subject.routing_claim)
            full = gated_experts(
                subject.user_bank,
                gate=gate,
                subject=candidate,
                subject_handle=CANDIDATE_HANDLE,
                others=others,
            )
            traffic = gate_traffic(full, embed_sets(self.backbone, self.bank, [own])[own.name])
        return sample_members(
            others, budget=budget, traffic=traffic, seed=self.policy.sample_seed, salt=str(subject.version.id)
        )

    def _load_members(
        self,
        loader: SlotLoader,
        subject: EvaluatedVersion,
        members: tuple[Expert, ...],
        notes: dict[str, Any],
    ) -> list[Expert]:
        """Load the sampled members; one that cannot be loaded is left out and named in the report."""
        loaded, failed = [], {}
        for m in members:
            try:
                version = self.registry.get_version_by_id(
                    tenant_id=subject.tenant_id, version_id=m.version_id
                )
                loader.load(member_handle(m), version)
            except LorafleetError as exc:
                failed[member_label(m)] = f"{type(exc).__name__}: {exc}"
                continue
            loaded.append(m)
        if failed:
            notes["unloadable_members"] = failed
        return loaded

    def _member_set(self, subject: EvaluatedVersion, member: Expert) -> EvalSet:
        version = self.registry.get_version_by_id(tenant_id=subject.tenant_id, version_id=member.version_id)
        # a personal member belongs to the bank's user (for a task candidate: the enrolled user whose bank it is)
        owner = subject.user_bank.user_id if member.kind == "personal" and subject.user_bank else None
        return holdout_set(
            self.db,
            VersionFeedback(subject.tenant_id, version, owner),
            name=f"holdout:{member_label(member)}",
            adapter_id=member.adapter_id,
            own=False,
            policy=self.policy,
        )

    def _member(
        self,
        subject: EvaluatedVersion,
        version: AdapterVersion,
        key: tuple[float, ...] | None,
        claim: tuple[float, ...] | None,
    ) -> Expert:
        kind = "task" if subject.adapter.is_task_adapter else "personal"
        return version_member(
            adapter=subject.adapter, version=version, kind=kind, routing_key=key, routing_claim=claim
        )

    def _routing(self, version: AdapterVersion) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        return self.db.run(QARepository(dialect=self.db.dialect).routing, version_id=version.id)


def _preference_beta(subject: EvaluatedVersion) -> float | None:
    """DPO's beta for a candidate trained with DPO (its held-out pairs then go to the preference rule), else None."""
    config = training_config_of(subject.version)
    return config.dpo_beta if subject.kind == QAKind.CANDIDATE and config.trains_preferences else None


def _bank_notes(user_bank: ExpertSet, sample: MemberSample) -> dict[str, Any]:
    return {
        "user": user_bank.external_id,
        "revision": user_bank.revision,
        "gate": user_bank.gate.to_json(),
        "members": [member_label(m) for m in user_bank.members],
        "sampling": sample.to_json(),
    }


__all__ = ["Evaluation", "Evaluator", "EvaluatedVersion"]
