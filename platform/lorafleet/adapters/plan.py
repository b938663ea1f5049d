"""Routing plans: a batch's view of an adapter bank (which slots each sequence goes through, with what weight).

A plan is built once per batch from per-sequence lists of ``(slot, weight)`` (empty = base only) and holds
padded tensors ``slot_ids [batch, k]`` and ``weights [batch, k]`` (weight 0 = padding). Weights may also be
per token, ``[batch, seq, k]``, with the same slot ids per row. Everything a layer needs (device copies, the
unique slots, indices into them) is computed once per plan and cached, never per layer.

A decoder that rebuilds its plan from the rows' routes at every step (continuous batching) gets the very same
plan object back from :meth:`SlotPlan.from_rows` while the routes do not change (a small LRU of recent
plans), so nothing a plan caches is recomputed per step; and :attr:`SlotPlan.key` (the plan's content) lets
the bank layers keep their gathered rows across plans with equal routes.

A :class:`PartsPlan` routes one forward whose input holds several batches one after another, each with its own
plan: continuous batching's fused step feeds the running rows' next tokens and the newcomers' prompts in one
forward, so the frozen base weights are read (and, in 4-bit, dequantised) once for both.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafleet.errors import InvalidStateError, ValidationError

#: One entry of a row: a slot index and its weight.
Route = tuple[int, float]

#: How many recent plans ``SlotPlan.from_rows`` hands out again for equal routes.
PLAN_CACHE_SIZE = 64
_plans: OrderedDict[tuple[object, ...], SlotPlan] = OrderedDict()
_plans_lock = threading.Lock()


@dataclass(frozen=True)
class PlanTensors:
    """A plan's tensors on one device, as a layer's forward consumes them."""

    slot_ids: torch.Tensor  # [batch, k] int64, padding replaced by a used slot (with weight 0)
    local_ids: torch.Tensor  # [batch, k] int64, index into ``used``
    weights: torch.Tensor  # [batch, k] or [batch, seq, k] float32
    used: torch.Tensor  # [n_used] int64, sorted unique slots with a non-zero weight


@dataclass(frozen=True)
class Segment:
    """Rows ``start:end`` of a batch, all through ``slot`` with ``weight`` (``slot`` None: the base only)."""

    slot: int | None
    weight: float
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """Per-sequence routes through an adapter bank; build it with :meth:`from_rows` or :meth:`single`."""

    slot_ids: torch.Tensor  # [batch, k] int64 on CPU, -1 = padding
    weights: torch.Tensor  # [batch, k] or [batch, seq, k] float32 on CPU, 0 where padded
    used_slots: tuple[int, ...] = field(init=False)
    #: ``(slot, weight)`` when every row routes through exactly one and the same slot and weight, else None
    uniform: tuple[int, float] | None = field(init=False)
    _cache: dict[Any, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        _check_plan_tensors(self.slot_ids, self.weights)
        object.__setattr__(
            self, "slot_ids", self.slot_ids.detach().to("cpu")
        )  # device copies are cached below
        object.__setattr__(self, "weights", self.weights.detach().to("cpu", torch.float32))
        active = (
            self.weights != 0 if self.weights.dim() == 2 else (self.weights != 0).any(dim=1)
        )  # [batch, k]
        active &= self.slot_ids >= 0
        object.__setattr__(
            self, "used_slots", tuple(sorted({int(s) for s in self.slot_ids[active].tolist()}))
        )
        object.__setattr__(self, "uniform", self._find_uniform(active))

    @classmethod
    def from_rows(cls, rows: Sequence[Iterable[Route]]) -> SlotPlan:
        """Build a plan from one list of ``(slot, weight)`` per sequence; an empty list means base only."""
        merged: list[dict[int, float]] = []
        for i, row in enumerate(rows):
            routes: dict[int, float] = {}
            for slot, weight in row:
                if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
                    raise ValidationError(f"row {i}: slot must be a non-negative int, got {slot!r}")
                if not math.isfinite(float(weight)):
                    raise ValidationError(f"row {i}: weight for slot {slot} is not finite")
                routes[slot] = routes.get(slot, 0.0) + float(weight)  # a repeated slot adds its weights
            merged.append(routes)
        if not merged:
            raise ValidationError("a routing plan needs at least one row")
        routes_key = (cls, *(tuple(sorted(r.items())) for r in merged))
        with _plans_lock:
            plan = _plans.get(routes_key)
            if plan is not None:
                _plans.move_to_end(routes_key)
                return plan
        plan = cls._from_merged(merged)
        with _plans_lock:
            _plans[routes_key] = plan
            while len(_plans) > PLAN_CACHE_SIZE:
                _plans.popitem(last=False)
        return plan

    @classmethod
    def _from_merged(cls, merged: list[dict[int, float]]) -> SlotPlan:
        k = max(1, max(len(r) for r in merged))
        slot_ids = torch.full((len(merged), k), -1, dtype=torch.int64)  # [batch, k]
        weights = torch.zeros((len(merged), k), dtype=torch.float32)  # [batch, k]
        for i, routes in enumerate(merged):
            for j, (slot, weight) in enumerate(sorted(routes.items())):
                slot_ids[i, j], weights[i, j] = slot, weight
        return cls(slot_ids, weights)

    @classmethod
    def single(cls, slots: Sequence[int | None]) -> SlotPlan:
        """One adapter per sequence with weight 1 (``None`` = base only): the common serving/training case."""
        return cls.from_rows([[] if s is None else [(s, 1.0)] for s in slots])

    @classmethod
    def base_only(cls, batch_size: int) -> SlotPlan:
        """Every sequence through the base model only."""
        return cls.from_rows([[] for _ in range(batch_size)])

    @property
    def batch_size(self) -> int:
        return int(self.slot_ids.shape[0])

    @property
    def k(self) -> int:
        """Entries per row (the longest row; shorter rows are padded with weight 0)."""
        return int(self.slot_ids.shape[1])

    @property
    def per_token(self) -> bool:
        return self.weights.dim() == 3

    @property
    def key(self) -> tuple[object, ...]:
        """The plan's content (slot ids and weights, exactly): equal keys compute the same thing, so what a layer
        derives from one plan serves any plan with the same key."""
        if "key" not in self._cache:
            self._cache["key"] = (
                tuple(self.slot_ids.shape),
                tuple(self.weights.shape),
                self.slot_ids.numpy().tobytes(),
                self.weights.numpy().tobytes(),
            )
        return self._cache["key"]

    def with_token_weights(self, weights: torch.Tensor) -> SlotPlan:
        """The same slots per row with per-token weights ``[batch, seq, k]`` (e.g. from a token-level gate)."""
        return SlotPlan(self.slot_ids, weights.detach().to("cpu", torch.float32))

    def repeat_interleave(self, repeats: int) -> SlotPlan:
        """Each row repeated ``repeats`` times in place, as ``generate`` expands beams and return sequences."""
        key = ("repeat", repeats)
        if key not in self._cache:
            self._cache[key] = SlotPlan(
                self.slot_ids.repeat_interleave(repeats, dim=0),
                self.weights.repeat_interleave(repeats, dim=0),
            )
        return self._cache[key]

    def for_batch(self, batch_size: int) -> SlotPlan:
        """This plan for an input of ``batch_size`` rows: itself, or expanded when generate multiplies rows."""
        if batch_size == self.batch_size:
            return self
        if batch_size % self.batch_size == 0:
            return self.repeat_interleave(batch_size // self.batch_size)
        raise ValidationError(f"routing plan has {self.batch_size} rows but the input batch has {batch_size}")

    def tensors(self, device: torch.device) -> PlanTensors:
        """The plan's tensors on ``device`` (computed once per device and cached)."""
        key = ("tensors", str(device))
        if key not in self._cache:
            self._cache[key] = self._build_tensors(device)
        return self._cache[key]

    @property
    def segments(self) -> tuple[Segment, ...] | None:
        """Runs of consecutive rows through the same single slot and weight (``slot`` None = base only), when
        there are at most half as many runs as rows; else None.

        Semantics: a batch whose rows are grouped by adapter, as a training step packs each subject's rows
        together, is computed one matmul pair per run (LoRAX's SGMV segments) instead of gathering each row's
        weights. Mixtures and per-token weights have no segments.
        """
        key = ("segments",)
        if key not in self._cache:
            self._cache[key] = self._find_segments()
        return self._cache[key]

    def _find_segments(self) -> tuple[Segment, ...] | None:
        if self.per_token or self.k != 1:
            return None
        runs: list[Segment] = []
        for row, (slot, weight) in enumerate(
            zip(self.slot_ids[:, 0].tolist(), self.weights[:, 0].tolist(), strict=True)
        ):
            route = (None, 0.0) if slot < 0 or weight == 0 else (int(slot), float(weight))
            if runs and (runs[-1].slot, runs[-1].weight) == route:
                runs[-1] = Segment(route[0], route[1], runs[-1].start, row + 1)
            else:
                runs.append(Segment(route[0], route[1], row, row + 1))
        return tuple(runs) if 2 * len(runs) <= self.batch_size else None

    def routes_exactly(self, slots: Sequence[int]) -> bool:
        """True when every row routes through exactly ``slots``, each with weight 1 (what a merged bank computes)."""
        key = ("exactly", tuple(sorted(slots)))
        if key not in self._cache:
            expected = sorted(slots)
            ok = not self.per_token and all(
                sorted(int(s) for s, w in zip(ids, ws, strict=True) if s >= 0 and w != 0) == expected
                and all(float(w) == 1.0 for s, w in zip(ids, ws, strict=True) if s >= 0 and w != 0)
                for ids, ws in zip(self.slot_ids.tolist(), self.weights.tolist(), strict=True)
            )
            self._cache[key] = ok
        return self._cache[key]

    def _find_uniform(self, active: torch.Tensor) -> tuple[int, float] | None:
        if self.per_token or len(self.used_slots) != 1 or not bool((active.sum(dim=1) == 1).all()):
            return None
        row_weights = self.weights.masked_fill(~active, 0).sum(dim=1)  # [batch]
        if not bool((row_weights == row_weights[0]).all()):
            return None
        return self.used_slots[0], float(row_weights[0])

    def _build_tensors(self, device: torch.device) -> PlanTensors:
        used = torch.tensor(self.used_slots or (0,), dtype=torch.int64)  # [n_used]
        filler = used[0]
        slot_ids = torch.where(self.slot_ids >= 0, self.slot_ids, filler)  # [batch, k]
        local = torch.searchsorted(used, slot_ids).clamp_(max=used.numel() - 1)  # [batch, k]
        is_used = used[local] == slot_ids
        local = torch.where(is_used, local, 0)
        slot_ids = torch.where(is_used, slot_ids, filler)
        mask = is_used if self.weights.dim() == 2 else is_used.unsqueeze(1)
        weights = self.weights.masked_fill(~mask, 0.0)  # zero-weight routes become padding
        return PlanTensors(slot_ids.to(device), local.to(device), weights.to(device), used.to(device))


def _check_plan_tensors(slot_ids: torch.Tensor, weights: torch.Tensor) -> None:
    if slot_ids.dim() != 2 or slot_ids.dtype != torch.int64:
        raise ValidationError(
            f"slot_ids must be int64 [batch, k], got {slot_ids.dtype} {tuple(slot_ids.shape)}"
        )
    if weights.dim() not in (2, 3) or not weights.is_floating_point():
        raise ValidationError(
            f"weights must be float [batch, k] or [batch, seq, k], got {tuple(weights.shape)}"
        )
    if weights.shape[0] != slot_ids.shape[0] or weights.shape[-1] != slot_ids.shape[1]:
        raise ValidationError(f"weights {tuple(weights.shape)} do not match slot_ids {tuple(slot_ids.shape)}")
    if not bool(torch.isfinite(weights).all()):
        raise ValidationError("routing weights must be finite")


@dataclass(frozen=True)
class PlanPart:
    """Rows ``start:end`` of a flattened input (``[tokens, 1, d]``), viewed as ``[batch, seq]`` and routed by
    ``plan`` (None: the base only). ``reuse``: the layers may keep this plan's gathered rows for the next forward
    (the running rows of a decode batch); other parts are computed without touching what the layers keep."""

    start: int
    end: int
    batch: int
    seq: int
    plan: SlotPlan | None
    reuse: bool = False


@dataclass(frozen=True)
class PartsPlan:
    """Several plans over consecutive parts of one flattened input (module docstring)."""

    parts: tuple[PlanPart, ...]

    def __post_init__(self) -> None:
        at = 0
        for part in self.parts:
            if part.start != at or part.end - part.start != part.batch * part.seq:
                raise ValidationError(f"plan parts must tile the input: {part} after row {at}")
            if part.plan is not None and part.plan.batch_size != part.batch:
                raise ValidationError(f"part {part} has a plan of {part.plan.batch_size} rows")
            at = part.end

    @property
    def rows(self) -> int:
        return self.parts[-1].end if self.parts else 0

    @property
    def used_slots(self) -> tuple[int, ...]:
        return tuple(sorted({s for p in self.parts if p.plan is not None for s in p.plan.used_slots}))

    def routes_exactly(self, slots: Sequence[int]) -> bool:
        """True when every part routes every row through exactly ``slots`` (``SlotPlan.routes_exactly``)."""
        return all(p.plan is not None and p.plan.routes_exactly(slots) for p in self.parts)


class PlanState:
    """The plan in force for one bank, shared by all its layers (set by ``AdapterBank.use``).

    It is one plain attribute rather than a context variable so that recomputation during backward (gradient
    checkpointing, possibly on another thread) sees the same plan, as long as backward runs inside the context.
    """

    def __init__(self) -> None:
        self.plan: SlotPlan | PartsPlan | None = None
        self.active = False
        #: slots merged into the base weights (a stack); while non-empty the layers add no LoRA delta
        self.merged_slots: list[int] = []

    def current(self) -> SlotPlan | PartsPlan | None:
        """The plan for this forward (None = base only); raises when no routing context is open."""
        if not self.active:
            raise InvalidStateError(
                "forward through an adapter bank without a routing plan: wrap it in `with bank.use(plan):` "
                "(or `with bank.base_only():` for the base model alone)"
            )
        return self.plan
