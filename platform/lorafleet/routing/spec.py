"""What a gate is asked to do (``GateSpec``) and what it decides (``GateDecision``): plain, torch-free objects.

``GateSpec`` is stored per user as JSON (``gate_settings``), set by the tenant; a user without settings gets
the default (see ``lorafleet.routing.experts.effective_gate_spec``). A ``GateDecision`` is one request's sparse set
of ``(index into ExpertSet.members, weight)``; empty means the base model alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lorafleet.errors import ValidationError

GateKind = Literal["centroid", "learned", "fixed"]
GATE_KINDS: tuple[str, ...] = ("centroid", "learned", "fixed")
MAX_TOP_K = 64
_SPEC_KEYS = frozenset({"kind", "top_k", "temperature", "fixed_weights", "learned_version_id"})


@dataclass(frozen=True)
class GateSpec:
    """How a user's requests are routed over their bank.

    - ``centroid``: cosine similarity to each member's routing key, top-``top_k``, softmax at ``temperature``;
    - ``learned``: the user's trained gate (``learned_version_id``; None = the live one, when there is one);
    - ``fixed``: ``fixed_weights`` (adapter name -> weight, applied as given; ``task:<name>`` or
      ``personal:<name>`` picks one kind when a personal and a task adapter share a name).
    """

    kind: GateKind = "centroid"
    top_k: int = 2
    #: measured on SmolLM2-135M, a 3-task bank, scores without the common direction (tests/benchmarks/README.md,
    #: "Routing on the real backbone"): gated loss +3 % over the oracle at 0.05 against +8 % at 0.1, and the best
    #: soft gate on unseen phrasings; top-1 matches the oracle when routing is right but doubles the loss when not
    temperature: float = 0.05
    fixed_weights: dict[str, float] | None = None
    learned_version_id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValidationError(f"gate kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not 1 <= self.top_k <= MAX_TOP_K
        ):
            raise ValidationError(f"top_k must be an int in [1, {MAX_TOP_K}], got {self.top_k!r}")
        if not isinstance(self.temperature, int | float) or not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValidationError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "fixed_weights", _check_fixed(self.kind, self.fixed_weights))
        _check_learned(self.kind, self.learned_version_id)

    def __hash__(self) -> int:
        weights = None if self.fixed_weights is None else tuple(sorted(self.fixed_weights.items()))
        return hash((self.kind, self.top_k, self.temperature, weights, self.learned_version_id))

    def to_json(self) -> dict[str, Any]:
        """The stored form (``gate_settings.spec``)."""
        return {
            "kind": self.kind,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "fixed_weights": None if self.fixed_weights is None else dict(sorted(self.fixed_weights.items())),
            "learned_version_id": self.learned_version_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateSpec:
        """Parse a stored or submitted spec; unknown keys and bad values raise ``ValidationError``."""
        if not isinstance(data, Mapping):
            raise ValidationError(f"gate spec must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - _SPEC_KEYS)
        if unknown:
            raise ValidationError(f"gate spec has unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if v is not None})  # None = the default


@dataclass(frozen=True)
class GateDecision:
    """One request's routes: ``(index into ExpertSet.members, weight)``, heaviest first; empty = base only.

    Per-request gating puts one set of weights on the whole sequence. A per-token gate will add per-token
    weights here (same member indices); callers that build plans with ``gates.plan_from_decisions`` need no
    change.
    """

    routes: tuple[tuple[int, float], ...] = field(default_factory=tuple)

    @property
    def is_base_only(self) -> bool:
        return not self.routes

    def to_slots(self, slot_of_member: Sequence[int]) -> list[tuple[int, float]]:
        """The routes with member indices replaced by bank slots (``slot_of_member[i]`` holds member ``i``)."""
        return [(slot_of_member[i], w) for i, w in self.routes]


def _check_fixed(kind: str, weights: Mapping[str, float] | None) -> dict[str, float] | None:
    if kind != "fixed":
        if weights is not None:
            raise ValidationError("fixed_weights are only for a fixed gate")
        return None
    if not isinstance(weights, Mapping) or not weights:
        raise ValidationError("a fixed gate needs fixed_weights: {adapter name: weight, ...}")
    out: dict[str, float] = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise ValidationError("fixed_weights keys must be adapter names")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValidationError(f"fixed weight of {name!r} must be a finite number")
        if weight < 0:
            raise ValidationError(f"fixed weight of {name!r} must be >= 0")
        out[name] = float(weight)
    return out


def _check_learned(kind: str, version_id: int | None) -> None:
    if version_id is None:
        return
    if kind != "learned":
        raise ValidationError("learned_version_id is only for a learned gate")
    if isinstance(version_id, bool) or not isinstance(version_id, int) or version_id < 1:
        raise ValidationError(f"learned_version_id must be a positive int, got {version_id!r}")
