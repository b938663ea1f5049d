"""Gates over a user's experts: for each request row, a sparse set of ``(member, weight)`` (a ``GateDecision``).

- ``CentroidGate`` (training-free): cosine similarity between the request's pooled embedding and each member's
  routing key, the ``top_k`` best, softmax of ``score / temperature``. Given the backbone's common direction
  (``routing.embeddings.common_direction``), both sides are compared without it. Members without a routing key are not
  scored; only when no member has a usable key does the gate fall back to the keyless *personal* adapters,
  weighted equally (a user whose only adapter predates routing keys still gets it), else base only.
- ``LearnedGate``: the user's trained gate (``lorafleet.routing.learned``); its softmax over the members it
  knows, ``top_k`` kept and renormalised (its logits are on a trained scale, so ``temperature`` is not
  applied). When the bank holds a member the gate was not trained on (a new adapter or enrolment), it defers
  to the centroid gate until it is retrained.
- ``FixedGate``: the tenant's weights by adapter name, the same for every request, applied as given.

Decisions are per request (one set of weights for the whole sequence). Callers turn them into a batch's
``SlotPlan`` with :func:`plan_from_decisions`, which is where per-token weights will be applied later, so a
per-token gate will not change callers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from lorafleet.adapters import SlotPlan
from lorafleet.errors import ValidationError
from lorafleet.routing.embeddings import claim_logits
from lorafleet.routing.experts import ExpertSet
from lorafleet.routing.spec import GateDecision, GateSpec

if TYPE_CHECKING:
    from lorafleet.adapters import SlotPlan
    from lorafleet.routing.learned import LearnedGateModel

__all__ = [
    "CentroidGate",
    "FixedGate",
    "Gate",
    "GateDecision",
    "GateSpec",
    "LearnedGate",
    "LearnedGateLoader",
    "build_gate",
    "plan_from_decisions",
    "top_k_decisions",
]

logger = logging.getLogger(__name__)
#: a learned gate by version id (a serving cache wraps the registry download)
LearnedGateLoader = Callable[[int], "LearnedGateModel"]
_KEY_CACHE_SIZE = 256
#: routing claims of a bank's keyed members: their positions among them, and the claims ``[n_claimed, hidden + 1]``
_Claims = tuple[list[int], torch.Tensor] | None


class Gate(Protocol):
    """Routes each row of a batch of one user's requests over that user's experts.

    The gates here also have ``needs_embeddings(user_bank) -> bool`` (optional for other gates): False when
    the decisions do not depend on the embeddings (zeros give the same), so a caller may skip the base forward.
    """

    def decide(self, user_bank: ExpertSet, embeddings: torch.Tensor) -> list[GateDecision]:
        """One decision per row of ``embeddings`` ``[batch, hidden]`` (pooled, from ``pooled_embeddings``)."""
        ...


def top_k_decisions(
    scores: torch.Tensor, *, members: Sequence[int], top_k: int, temperature: float = 1.0
) -> list[GateDecision]:
    """Per row of ``scores`` ``[batch, n]`` (column j = member ``members[j]``): the ``top_k`` highest, with
    softmax(score / temperature) over them as weights, heaviest first; underflowed (zero) weights are dropped."""
    if scores.dim() != 2 or scores.shape[1] != len(members):
        raise ValidationError(f"scores {tuple(scores.shape)} do not match {len(members)} members")
    if scores.shape[1] == 0:
        return [GateDecision() for _ in range(scores.shape[0])]
    k = min(top_k, scores.shape[1])
    values, columns = scores.float().topk(k, dim=-1)  # [batch, k], sorted descending
    weights = torch.softmax(values / temperature, dim=-1)  # [batch, k]
    return [
        GateDecision(tuple((members[c], w) for c, w in zip(cols, ws, strict=True) if w > 0.0))
        for cols, ws in zip(columns.tolist(), weights.tolist(), strict=True)
    ]


#: how much nearer a general prompt than an adapter's key a request must be to go to the base. Measured on
#: SmolLM2-135M (tests/benchmarks/README.md, "General prompts go to the base"), 3 seeds of 4 users: at 0.01,
#: 92-96 % of unseen personal questions stay on their adapter and 89-92 % of never-seen general prompts go to the
#: base; at 0 it is 83-88 % and 94 %, at 0.02 96-100 % and 84 %
GENERAL_MARGIN = 0.01


class CentroidGate:
    """Cosine similarity to the members' routing keys, top-k, softmax with a temperature (training-free).

    With ``common`` (a unit ``[hidden]`` vector: the mean pooled embedding of varied prompts on this backbone,
    ``routing.embeddings.common_direction``) queries and keys lose their component along it before the cosine.
    A pretrained model's pooled embeddings share one large direction: on SmolLM2-135M any two prompts have a
    cosine of about 0.9, so two keys differ by a few hundredths, and softmax at temperature 0.1 splits a
    personal question about 0.6 / 0.4 between the user's adapter and a task adapter, whose mixture answers
    neither. Without that direction the same question gets about 0.9 on its own adapter (tests/benchmarks/README.md,
    "Routing on the real backbone"). A projection, not a subtraction, so a stored key's length does not matter.

    With ``general`` (embeddings of the shipped general prompts on this backbone, ``[n, hidden]``;
    ``training.general_prompts.general_exemplars``) the base model answers a prompt that no member *holds*, so a
    question no adapter was trained for ("What is the capital of France?") gets the base's answer, not one bent
    towards a user's facts:

    - a member with a routing claim (``routing.embeddings.fit_claim``, stored with versions trained since claims)
      holds the prompts its claim scores above 0;
    - a member without one holds a prompt at least as similar to its key as to the nearest general prompt less
      ``general_margin`` (``GENERAL_MARGIN``). Exemplars, not their mean: general prompts are too varied for one
      centroid.

    The claim is the better judge (tests/benchmarks/README.md, "A probe that claims an adapter's prompts"): the
    difference between "What's my home city?" and "What is the capital of Spain?" is a direction, not a
    neighbourhood, and a user's later facts (a sign-off, a job) sit near general prompts.
    """

    def __init__(
        self,
        *,
        top_k: int = 2,
        temperature: float = GateSpec.temperature,
        general: Sequence[Sequence[float]] | torch.Tensor | None = None,
        common: Sequence[float] | torch.Tensor | None = None,
        general_margin: float = GENERAL_MARGIN,
    ) -> None:
        GateSpec(top_k=top_k, temperature=temperature)  # the same checks as a stored spec
        self.top_k, self.temperature, self.general_margin = top_k, temperature, general_margin
        self.common = (
            None
            if common is None
            else F.normalize(torch.as_tensor(common, dtype=torch.float32).flatten(), dim=0)
        )  # [hidden]
        self.general = (
            None
            if general is None or len(general) == 0
            else F.normalize(torch.as_tensor(general, dtype=torch.float32).reshape(len(general), -1), dim=-1)
        )  # [n, hidden]
        self._keys: OrderedDict[tuple[str, int], tuple[list[int], torch.Tensor, torch.Tensor, _Claims]] = (
            OrderedDict()
        )

    def needs_embeddings(self, user_bank: ExpertSet) -> bool:
        """With two or more keyed members there is a choice to make; with one, only against the base."""
        keyed = sum(1 for m in user_bank.members if m.routing_key)
        return keyed >= 2 or (keyed == 1 and self.general is not None)

    def decide(self, user_bank: ExpertSet, embeddings: torch.Tensor) -> list[GateDecision]:
        batch = _check_embeddings(embeddings)
        if not user_bank.members:
            return [GateDecision() for _ in range(batch)]
        keyed, keys, padding, claims = self._usable_keys(user_bank, hidden=int(embeddings.shape[1]))
        if not keyed:
            return [_keyless_decision(user_bank, top_k=self.top_k)] * batch
        queries = F.normalize(embeddings.detach().float().cpu(), dim=-1)  # [batch, hidden]
        scores = _member_scores(queries, keys, padding)  # [batch, n_keyed]: cosine to the nearest key vector
        common = self.common if self.common is not None and self.common.shape[0] == keys.shape[2] else None
        routed = (
            scores
            if common is None
            else _member_scores(_without(queries, common), _without(keys, common), padding)
        )
        decisions = top_k_decisions(routed, members=keyed, top_k=self.top_k, temperature=self.temperature)
        if self.general is None or self.general.shape[1] != queries.shape[1]:
            return decisions
        # a member holds a prompt it claims; one without a claim holds a prompt at least as near its key as the
        # nearest general prompt less the margin (the plain cosine, on which GENERAL_MARGIN was measured)
        general = (queries @ self.general.T).max(dim=1).values - self.general_margin  # [batch]
        holds = scores >= general[:, None]  # [batch, n_keyed]
        if claims is not None:
            claimed, weights = claims
            holds[:, claimed] = claim_logits(weights, queries) > 0
        to_base = ~holds.any(dim=1)  # [batch]: no member holds it, the base answers
        return [GateDecision() if base else d for d, base in zip(decisions, to_base.tolist(), strict=True)]

    def _usable_keys(
        self, user_bank: ExpertSet, *, hidden: int
    ) -> tuple[list[int], torch.Tensor, torch.Tensor, _Claims]:
        """Members with a key of the embeddings' size, their unit key vectors ``[n_keyed, k, hidden]`` (a key holds
        one or more vectors, ``routing.embeddings.routing_key``; shorter ones are padded), the padding mask
        ``[n_keyed, k]`` (True = padding) and the routing claims of this size (their positions among the keyed
        members and ``[n_claimed, hidden + 1]``; None when none has one). Cached per bank revision."""
        cache_key = (user_bank.revision, hidden)
        if cache_key in self._keys:
            self._keys.move_to_end(cache_key)
            return self._keys[cache_key]
        keyed = [
            i for i, m in enumerate(user_bank.members) if m.routing_key and len(m.routing_key) % hidden == 0
        ]
        wrong = [m.adapter_name for m in user_bank.members if m.routing_key and len(m.routing_key) % hidden]
        if wrong:
            logger.warning("routing keys of %s do not match hidden size %d: not scored", wrong, hidden)
        vectors = [
            torch.tensor(user_bank.members[i].routing_key or (), dtype=torch.float32).reshape(-1, hidden)
            for i in keyed
        ]
        width = max((len(v) for v in vectors), default=1)
        keys = torch.zeros(len(keyed), width, hidden)  # [n_keyed, k, hidden]
        padding = torch.ones(len(keyed), width, dtype=torch.bool)  # [n_keyed, k]
        for row, v in enumerate(vectors):
            keys[row, : len(v)] = F.normalize(v, dim=-1)
            padding[row, : len(v)] = False
        found = [user_bank.members[i].routing_claim for i in keyed]
        claimed = [j for j, c in enumerate(found) if c is not None and len(c) == hidden + 1]
        claims = (
            (claimed, torch.tensor([found[j] for j in claimed], dtype=torch.float32)) if claimed else None
        )
        self._keys[cache_key] = (keyed, keys, padding, claims)
        if len(self._keys) > _KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return keyed, keys, padding, claims


def _member_scores(queries: torch.Tensor, keys: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Each query's cosine to each member's nearest key vector ``[batch, n_keyed]`` (``queries`` ``[batch, hidden]``
    and ``keys`` ``[n_keyed, k, hidden]`` unit rows; ``padding`` ``[n_keyed, k]`` marks unused key slots)."""
    cosines = torch.einsum("bh,nkh->bnk", queries, keys)  # [batch, n_keyed, k]
    return cosines.masked_fill(padding, float("-inf")).max(dim=2).values


def _without(vectors: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``vectors`` ``[..., hidden]`` minus their component along the unit ``direction``, re-normalised."""
    return F.normalize(vectors - (vectors @ direction).unsqueeze(-1) * direction, dim=-1)


class FixedGate:
    """The tenant's weights by adapter name for every request (names not in the bank are ignored)."""

    def __init__(self, *, weights: Mapping[str, float]) -> None:
        checked = GateSpec(kind="fixed", fixed_weights=dict(weights)).fixed_weights
        self.weights: dict[str, float] = dict(checked or {})

    def needs_embeddings(self, user_bank: ExpertSet) -> bool:
        return False

    def decide(self, user_bank: ExpertSet, embeddings: torch.Tensor) -> list[GateDecision]:
        return [self.decision(user_bank)] * _check_embeddings(embeddings)

    def decision(self, user_bank: ExpertSet) -> GateDecision:
        """``name`` matches the personal adapter of that name if any, else the task adapter;
        ``personal:<name>`` / ``task:<name>`` match one kind only."""
        chosen: dict[int, float] = {}
        for name, weight in self.weights.items():
            index = _find_member(user_bank, name)
            if index is not None and weight > 0:
                chosen[index] = chosen.get(index, 0.0) + weight
        return GateDecision(tuple(sorted(chosen.items(), key=lambda item: (-item[1], item[0]))))


class LearnedGate:
    """A trained gate over pooled embeddings; defers to ``fallback`` when absent or not trained for this bank."""

    def __init__(self, *, model: LearnedGateModel | None, top_k: int, fallback: CentroidGate) -> None:
        self.model, self.top_k, self.fallback = model, top_k, fallback

    def covers(self, user_bank: ExpertSet, *, hidden: int) -> bool:
        """Whether the gate knows every member of the bank and takes embeddings of this size."""
        if self.model is None or self.model.hidden_size != hidden:
            return False
        known = set(self.model.class_adapter_ids)
        return all(m.adapter_id in known for m in user_bank.members)

    def needs_embeddings(self, user_bank: ExpertSet) -> bool:
        if self.model is not None and self.covers(user_bank, hidden=self.model.hidden_size):
            return len(user_bank.members) >= 2
        return self.fallback.needs_embeddings(user_bank)

    def decide(self, user_bank: ExpertSet, embeddings: torch.Tensor) -> list[GateDecision]:
        batch = _check_embeddings(embeddings)
        if not user_bank.members:
            return [GateDecision() for _ in range(batch)]
        if self.model is None or not self.covers(user_bank, hidden=int(embeddings.shape[1])):
            return self.fallback.decide(user_bank, embeddings)
        logits = self.model.logits(embeddings)  # [batch, n_classes]
        classes = {adapter_id: c for c, adapter_id in enumerate(self.model.class_adapter_ids)}
        columns = [classes[m.adapter_id] for m in user_bank.members]  # members that left are masked out
        return top_k_decisions(
            logits[:, columns], members=list(range(len(user_bank.members))), top_k=self.top_k
        )


def build_gate(
    spec: GateSpec,
    *,
    load_learned: LearnedGateLoader | None = None,
    general: Sequence[Sequence[float]] | torch.Tensor | None = None,
    common: Sequence[float] | torch.Tensor | None = None,
) -> Gate:
    """The gate for a spec; a learned spec without a version (none trained yet) routes by centroid.

    ``general``: centroid gates (and a learned gate's centroid fallback) send prompts nearer the general
    prompts than to any adapter to the base model; ``common``: the backbone's common direction, left out of
    centroid scores (see :class:`CentroidGate`)."""
    centroid = CentroidGate(top_k=spec.top_k, temperature=spec.temperature, general=general, common=common)
    if spec.kind == "centroid":
        return centroid
    if spec.kind == "fixed":
        return FixedGate(weights=spec.fixed_weights or {})
    if spec.learned_version_id is None:
        return LearnedGate(model=None, top_k=spec.top_k, fallback=centroid)
    if load_learned is None:
        raise ValidationError("a learned gate spec needs load_learned to fetch the gate's weights")
    return LearnedGate(model=load_learned(spec.learned_version_id), top_k=spec.top_k, fallback=centroid)


def plan_from_decisions(decisions: Sequence[GateDecision], slot_maps: Sequence[Sequence[int]]) -> SlotPlan:
    """A batch's routing plan: row ``i`` follows ``decisions[i]`` with members mapped to bank slots by
    ``slot_maps[i]`` (``slot_maps[i][member index]`` = slot; rows of different users have different maps)."""
    if len(decisions) != len(slot_maps):
        raise ValidationError(f"{len(decisions)} decisions but {len(slot_maps)} slot maps")
    return SlotPlan.from_rows([d.to_slots(m) for d, m in zip(decisions, slot_maps, strict=True)])


def _check_embeddings(embeddings: torch.Tensor) -> int:
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValidationError(
            f"embeddings must be [batch, hidden] with batch >= 1, got {tuple(embeddings.shape)}"
        )
    return int(embeddings.shape[0])


def _keyless_decision(user_bank: ExpertSet, *, top_k: int) -> GateDecision:
    personal = [i for i, m in enumerate(user_bank.members) if m.kind == "personal"][:top_k]
    return GateDecision(tuple((i, 1.0 / len(personal)) for i in personal))


def _find_member(user_bank: ExpertSet, name: str) -> int | None:
    kind, _, rest = name.partition(":")
    if rest and kind in ("personal", "task"):
        wanted = [(kind, rest)]
    else:
        wanted = [("personal", name), ("task", name)]
    for want_kind, want_name in wanted:
        for i, m in enumerate(user_bank.members):
            if m.kind == want_kind and m.adapter_name == want_name:
                return i
    return None
