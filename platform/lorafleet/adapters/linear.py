"""``BankLinear``: one frozen base linear layer plus a bank of LoRA slots, mixed per row by a routing plan.

Slot weights are stacked per layer (LoRAX style): ``lora_A [n_slots, r_max, d_in]``, ``lora_B [n_slots, d_out,
r_max]``, zero-padded above each slot's rank. A forward gathers only the slots its batch uses, so its cost does
not grow with the number of loaded slots. Training uses per-slot ``nn.Parameter`` *views* into those stacks
(see :meth:`BankLinear.slot_parameters`): slots not in the batch are not in the autograd graph at all.

**Decoding reuses the gathered rows.** Rows through different adapters need each row's A and B side by side for
one batched matmul; gathering them (``index_select`` over the stacks) at every decode step of every layer cost
about 12 % of a decode's CPU time, yet the rows and slots stay the same from one step to the next. Without
gradients the gathered, bucketed tensors of a plan (:class:`RowWork`) are kept per layer, keyed by the plan's
content (``SlotPlan.key``, so a plan rebuilt from the same routes at every step hits) and by the stacks' version
counters (any write into a slot, including an optimiser step through a slot's parameter view, invalidates them).
One entry per layer: its memory is the batch's share of the adapters (rows x rank x (d_in + d_out)), at most one
batch's worth, released by :meth:`BankLinear.drop_cached_work` and replaced when the batch's routes change.

**Rank buckets.** Each row is computed at its bucket's rank (the next power of two above its largest slot rank,
never above the bucket's largest rank in use) instead of the largest rank of the plan, so a rank-4 adapter
batched with a rank-64 one does not pay 16 times its own work: one matmul pair per bucket in use.

**Parts.** Under a :class:`PartsPlan` the base layer runs once over the whole flattened input and each part adds
its own rows' deltas; only the part marked ``reuse`` (the running decode rows) keeps its gathered rows, so a
one-off part (newcomers' prompts) never evicts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.adapters.layers import BaseLayerKind
from lorafleet.adapters.plan import PartsPlan, PlanState, Segment, SlotPlan
from lorafleet.errors import AdapterShapeError, MergeError, ValidationError


@dataclass(frozen=True)
class RowBucket:
    """Rows of a batch computed together at one rank: their gathered A and B and their per-entry coefficients."""

    #: the batch rows in this bucket ([n] int64 on the layer's device), None = every row, in order
    rows: torch.Tensor | None
    rank: int
    a: torch.Tensor  # [n, k * rank, d_in] contiguous: each row's k slots' A
    b: torch.Tensor  # [n, k * rank, d_out] contiguous (B transposed, so the second matmul reads rows)
    coef: torch.Tensor  # [n, 1, k * rank] or, per-token plans, [n, seq, k * rank]: scaling x routing weight


@dataclass(frozen=True)
class RowWork:
    """A plan's gathered LoRA weights on one layer, reused by every forward of that plan (module docstring)."""

    key: tuple[Any, ...]
    buckets: tuple[RowBucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.buckets for t in (b.a, b.b, b.coef))


def rank_bucket(rank: int, max_rank: int) -> int:
    """The bucket a rank is computed in: the next power of two at or above it, capped at ``max_rank``."""
    return min(max_rank, 1 << max(0, rank - 1).bit_length())


class BankLinear(nn.Module):
    """Wraps a base layer of any registered kind (plain, 4-bit, 8-bit) and adds each row's weighted LoRA deltas."""

    lora_A: torch.Tensor  # [n_slots, r_max, d_in]
    lora_B: torch.Tensor  # [n_slots, d_out, r_max]
    coef_table: torch.Tensor  # [n_slots, r_max]
    dropout_table: torch.Tensor  # [n_slots]

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        kind: BaseLayerKind,
        n_slots: int,
        max_rank: int,
        plan_state: PlanState,
        dtype: torch.dtype = torch.float32,
        name: str = "",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.name = name
        self.in_features, self.out_features = kind.dims(base_layer)
        self.n_slots, self.max_rank = n_slots, max_rank
        device = kind.device(base_layer)
        shapes = {
            "lora_A": (n_slots, max_rank, self.in_features),
            "lora_B": (n_slots, self.out_features, max_rank),
            "coef_table": (n_slots, max_rank),  # scaling where r < the slot's rank, else 0 (the rank mask)
            "dropout_table": (n_slots,),
        }
        for (
            buffer_name,
            shape,
        ) in shapes.items():  # not persistent: adapters are saved per slot, in PEFT format
            self.register_buffer(
                buffer_name, torch.zeros(shape, dtype=dtype, device=device), persistent=False
            )
        self.ranks: list[int] = [0] * n_slots
        self.dropouts: list[float] = [0.0] * n_slots
        self.present: set[int] = set()
        self.slot_params: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        #: merge stack: (slot, the original weight tensor), restored as-is by unmerge
        self.merged: list[tuple[int, torch.Tensor]] = []
        self._plan_state = plan_state
        self._work: RowWork | None = None  # the last plan's gathered rows (module docstring)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (some model code reads ``proj.weight`` directly)."""
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind.name}, in={self.in_features}, out={self.out_features}, "
            f"slots={self.n_slots}, max_rank={self.max_rank}"
        )

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._plan_state.merged_slots:
            self._check_merged_plan()
            return result
        plan = self._plan_state.current()
        if plan is None or not any(s in self.present for s in plan.used_slots):
            return result
        if isinstance(plan, PartsPlan):
            return self._add_parts(result, x, plan)
        plan = plan.for_batch(x.shape[0])
        xa = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.lora_A.dtype)  # [batch, seq, d_in]
        out = result.reshape(x.shape[0], -1, self.out_features)  # [batch, seq, d_out]
        return self._add(out, xa, plan, reuse=True).reshape(result.shape)

    def _add(self, out: torch.Tensor, xa: torch.Tensor, plan: SlotPlan, *, reuse: bool) -> torch.Tensor:
        """``out [batch, seq, d_out]`` plus the plan's LoRA deltas of ``xa [batch, seq, d_in]``; ``reuse``: the
        gathered rows of a mixed batch may be kept for the next forward (``row_work``)."""
        if plan.uniform is not None:
            return self._add_uniform(out, xa, *plan.uniform)
        if plan.segments is not None:
            return self._add_segments(out, xa, plan.segments)
        if (
            reuse
            and not torch.is_grad_enabled()
            and not (self.training and any(self.dropouts[s] > 0 for s in plan.used_slots))
        ):
            return self._add_cached(out, xa, plan)
        return self._add_mixed(out, xa, plan)

    def _add_parts(self, result: torch.Tensor, x: torch.Tensor, plan: PartsPlan) -> torch.Tensor:
        """A flattened input ``[rows, 1, d_in]`` whose parts each have their own plan (module docstring)."""
        if x.shape[0] != plan.rows or x[0].numel() != self.in_features:
            raise ValidationError(f"a parts plan of {plan.rows} rows got an input of shape {tuple(x.shape)}")
        out = result.reshape(plan.rows, 1, self.out_features)  # [rows, 1, d_out]
        for part in plan.parts:
            if part.plan is None or not any(s in self.present for s in part.plan.used_slots):
                continue
            xa = (
                x[part.start : part.end].reshape(part.batch, part.seq, self.in_features).to(self.lora_A.dtype)
            )
            view = out[part.start : part.end].view(part.batch, part.seq, self.out_features)
            added = self._add(view, xa, part.plan, reuse=part.reuse)
            if added.data_ptr() != view.data_ptr():  # computed out of place: copy it back into the rows
                view.copy_(added)
        return out.reshape(result.shape)

    # --- serving: gathered rows reused across forwards ---------------------------------------------------------
    def _add_cached(self, out: torch.Tensor, xa: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
        """Rows through different slots or mixtures, without gradients: the plan's gathered rows (built on the
        first forward of the plan, reused until the plan or a slot changes), one matmul pair per rank bucket."""
        work = self.row_work(plan, xa.device)
        for bucket in work.buckets:
            coef = bucket.coef
            if coef.shape[1] != 1 and coef.shape[1] != xa.shape[1]:
                raise ValidationError(
                    f"per-token routing weights cover {coef.shape[1]} tokens, input has {xa.shape[1]}"
                )
            x = xa if bucket.rows is None else xa.index_select(0, bucket.rows)  # [n, seq, d_in]
            # A times x (not x times A transposed): on CPU the memory-bound rows stream about 20 % faster
            h = torch.bmm(bucket.a, x.transpose(1, 2)).transpose(1, 2).mul_(coef)  # [n, seq, k * r]
            if bucket.rows is None:
                out = _accumulate(out, h, bucket.b)  # [batch, seq, d_out]
            else:
                out = out.index_add_(0, bucket.rows, torch.bmm(h, bucket.b).to(out.dtype))
        return out

    def row_work(self, plan: SlotPlan, device: torch.device) -> RowWork:
        """The plan's gathered, bucketed rows on ``device``: the cached ones when neither the plan's routes nor any
        slot changed since they were built, else built now (and kept, when the stacks have version counters)."""
        version = self._stack_version()
        key = (plan.key, str(device), version)
        work = self._work
        if work is not None and version is not None and work.key == key:
            return work
        work = self._build_work(plan, device, key)
        self._work = work if version is not None else None
        return work

    def drop_cached_work(self) -> None:
        """Free the gathered rows kept for the last plan (they are rebuilt on the next forward that needs them)."""
        self._work = None

    def _stack_version(self) -> tuple[int, ...] | None:
        """Changes whenever a stack is written in place or replaced; None for inference tensors (no counter)."""
        stacks = (self.lora_A, self.lora_B, self.coef_table)
        if any(t.is_inference() for t in stacks):
            return None
        return (*(t._version for t in stacks), *(t.data_ptr() for t in stacks))

    def _build_work(self, plan: SlotPlan, device: torch.device, key: tuple[Any, ...]) -> RowWork:
        t = plan.tensors(device)
        slot_rows = plan.slot_ids.tolist()  # CPU copies: the grouping is decided on the host
        active = plan.weights != 0 if not plan.per_token else (plan.weights != 0).any(dim=1)  # [batch, k]
        row_ranks = [
            max((self.ranks[s] for s, on in zip(ids, act, strict=True) if s >= 0 and on), default=0)
            for ids, act in zip(slot_rows, active.tolist(), strict=True)
        ]
        groups: dict[int, list[int]] = {}
        for row, r in enumerate(row_ranks):
            if r > 0:  # rows whose slots have no weights on this layer add nothing here
                groups.setdefault(rank_bucket(r, self.max_rank), []).append(row)
        batch, k = t.slot_ids.shape
        buckets = []
        for rows in groups.values():
            r = max(row_ranks[i] for i in rows)
            everyone = len(rows) == batch
            index = None if everyone else torch.tensor(rows, dtype=torch.int64, device=device)
            ids = t.slot_ids if index is None else t.slot_ids.index_select(0, index)  # [n, k]
            weights = (
                t.weights if index is None else t.weights.index_select(0, index)
            )  # [n, k] or [n, seq, k]
            flat = ids.reshape(-1)
            n = ids.shape[0]
            a = self.lora_A[:, :r].index_select(0, flat).reshape(n, k * r, self.in_features)
            b = self.lora_B[:, :, :r].index_select(0, flat).transpose(1, 2)  # [n * k, r, d_out]
            b = b.contiguous().reshape(n, k * r, self.out_features)
            scale = self.coef_table[:, :r].index_select(0, flat).reshape(n, k, r).float()  # [n, k, r]
            if plan.per_token:
                coef = (weights.unsqueeze(-1) * scale.unsqueeze(1)).flatten(2)  # [n, seq, k * r]
            else:
                coef = (weights.unsqueeze(-1) * scale).reshape(n, 1, k * r)  # [n, 1, k * r]
            coef = coef.to(self.lora_A.dtype)
            buckets.append(RowBucket(index, r, a, b, coef))
        return RowWork(key, tuple(buckets))

    def _add_uniform(self, out: torch.Tensor, xa: torch.Tensor, slot: int, weight: float) -> torch.Tensor:
        """Every row through one slot with one weight: two plain matmuls, as PEFT computes a LoRA layer."""
        r = self.ranks[slot]
        lora_a, lora_b = self._slot_weights(slot)
        if self.training and self.dropouts[slot] > 0:
            xa = lora_dropout(xa, self.dropouts[slot])
        h = F.linear(xa, lora_a[:r]) * (self.coef_table[slot, :r] * weight)  # [batch, seq, r]
        flat = out.reshape(-1, self.out_features)  # [batch * seq, d_out]
        return _accumulate(flat, h.reshape(-1, r), lora_b[:, :r].T).reshape(out.shape)

    def _add_segments(self, out: torch.Tensor, xa: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """Rows grouped by adapter (a training step, a sorted batch): each run through its slot as a uniform batch,
        with no per-row gather of A and B."""
        if not torch.is_grad_enabled():  # serving: every run added into ``out`` itself
            for seg in segments:
                if seg.slot is not None and seg.slot in self.present:
                    part = out[seg.start : seg.end]  # [rows, seq, d_out]
                    updated = self._add_uniform(part, xa[seg.start : seg.end], seg.slot, seg.weight)
                    if updated.data_ptr() != part.data_ptr():  # not added in place (dtype cast)
                        part.copy_(updated)
            return out
        stacked = self._stacked_delta(xa, segments)
        if stacked is not None:
            return out + stacked.to(out.dtype)
        # training: one delta per run, concatenated and added once. Splitting (not slicing) the input keeps the
        # backward to one concatenation; slices would each zero-fill a full-batch gradient per module.
        parts = xa.split([seg.end - seg.start for seg in segments])
        deltas = [
            self._delta(x, seg.slot, seg.weight)
            if seg.slot is not None and seg.slot in self.present
            else x.new_zeros(*x.shape[:-1], self.out_features)
            for seg, x in zip(segments, parts, strict=True)
        ]
        delta = torch.cat(deltas) if len(deltas) > 1 else deltas[0]  # [batch, seq, d_out]
        return out + delta.to(out.dtype)

    def _stacked_delta(self, xa: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor | None:
        """Runs of equal length (a training step: every user brings ``batch_size`` rows), each through a slot of
        the same rank and dropout: their deltas ``[batch, seq, d_out]`` as two batched matmuls over the stacked
        slots' ``A`` and ``B``; None when the runs do not fit (the caller computes them one by one). The same
        numbers as one delta per run, in two calls instead of two per run plus a split and a concatenation."""
        rows = segments[0].end - segments[0].start
        used = [seg.slot for seg in segments if seg.slot is not None and seg.slot in self.present]
        if len(segments) < 2 or len(used) != len(segments) or any(s.end - s.start != rows for s in segments):
            return None
        if len({self.ranks[s] for s in used}) != 1 or len({self.dropouts[s] for s in used}) != 1:
            return None
        r, p = self.ranks[used[0]], self.dropouts[used[0]]
        weights = [self._slot_weights(s) for s in used]
        a = torch.stack([lora_a[:r] for lora_a, _ in weights])  # [runs, r, d_in]
        b = torch.stack([lora_b[:, :r] for _, lora_b in weights])  # [runs, d_out, r]
        coef = torch.stack(
            [self.coef_table[s, :r] * seg.weight for s, seg in zip(used, segments, strict=True)]
        ).unsqueeze(1)  # [runs, 1, r]
        x = xa.reshape(len(segments), -1, xa.shape[-1])  # [runs, rows * seq, d_in]
        if self.training and p > 0:
            x = lora_dropout(x, p)
        h = torch.bmm(x, a.transpose(1, 2)) * coef  # [runs, rows * seq, r]
        delta = torch.bmm(h, b.transpose(1, 2))  # [runs, rows * seq, d_out]
        return delta.reshape(*xa.shape[:-1], self.out_features)  # [batch, seq, d_out]

    def _delta(self, xa: torch.Tensor, slot: int, weight: float) -> torch.Tensor:
        """The slot's LoRA output for ``xa`` ``[rows, seq, d_in]`` -> ``[rows, seq, d_out]``, scaled by ``weight``."""
        r = self.ranks[slot]
        lora_a, lora_b = self._slot_weights(slot)
        if self.training and self.dropouts[slot] > 0:
            xa = lora_dropout(xa, self.dropouts[slot])
        h = F.linear(xa, lora_a[:r]) * (self.coef_table[slot, :r] * weight)  # [rows, seq, r]
        return F.linear(h, lora_b[:, :r])

    def _add_mixed(self, out: torch.Tensor, xa: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
        """Rows through different slots or mixtures: gather each row's k slots, then batched matmuls."""
        t = plan.tensors(xa.device)
        r = max(self.ranks[s] for s in plan.used_slots)
        rows_a, rows_b = self._gather_rows(plan, t.slot_ids, t.local_ids, r)  # [b,k,r,d_in], [b,k,d_out,r]
        batch, k = t.slot_ids.shape
        weights = t.weights.to(xa.dtype)
        coef = self.coef_table[t.slot_ids, :r]  # [batch, k, r]
        if plan.per_token:
            if weights.shape[1] != xa.shape[1]:
                raise ValidationError(
                    f"per-token routing weights cover {weights.shape[1]} tokens, input has {xa.shape[1]}"
                )
            coef = weights.unsqueeze(-1) * coef.unsqueeze(1)  # [batch, seq, k, r]
        else:
            coef = (weights.unsqueeze(-1) * coef).unsqueeze(1)  # [batch, 1, k, r]
        if self.training and any(self.dropouts[s] > 0 for s in plan.used_slots):
            keep = 1.0 - self.dropout_table[t.slot_ids]  # [batch, k]
            shape = (batch, k, xa.shape[1], xa.shape[2])
            mask = (torch.rand(shape, device=xa.device, dtype=xa.dtype) < keep[..., None, None]).to(xa.dtype)
            x_rows = xa.unsqueeze(1) * mask / keep[..., None, None]  # [batch, k, seq, d_in]
            h = torch.einsum("bksd,bkrd->bskr", x_rows, rows_a)  # [batch, seq, k, r]
        else:
            h = torch.bmm(xa, rows_a.reshape(batch, k * r, -1).transpose(1, 2))  # [batch, seq, k * r]
            h = h.view(batch, -1, k, r)  # [batch, seq, k, r]
        h = h * coef  # [batch, seq, k, r]
        for j in range(k):  # k is the mixture width (1-4), never the batch: one batched matmul per entry
            out = _accumulate(out, h[:, :, j], rows_b[:, j].transpose(1, 2))  # [batch, seq, d_out]
        return out

    def _gather_rows(
        self, plan: SlotPlan, slot_ids: torch.Tensor, local_ids: torch.Tensor, r: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k slots' A and B: stacked trainable views when training, else one gather per stack."""
        if torch.is_grad_enabled() and any(s in self.slot_params for s in plan.used_slots):
            pairs = [self._slot_weights(s) for s in plan.used_slots]
            used_a = torch.stack([a[:r] for a, _ in pairs])  # [n_used, r, d_in]
            used_b = torch.stack([b[:, :r] for _, b in pairs])  # [n_used, d_out, r]
            return used_a[local_ids], used_b[local_ids]
        batch, k = slot_ids.shape
        flat = slot_ids.reshape(-1)  # index_select is cheaper than advanced indexing on CPU
        rows_a = self.lora_A.index_select(0, flat)[:, :r]  # [batch * k, r, d_in]
        rows_b = self.lora_B.index_select(0, flat)[:, :, :r]  # [batch * k, d_out, r]
        return rows_a.view(batch, k, r, self.in_features), rows_b.view(batch, k, self.out_features, r)

    def _slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's trainable parameters when training, else plain views of the stacks."""
        if slot in self.slot_params and torch.is_grad_enabled():
            return self.slot_params[slot]
        return self.lora_A[slot], self.lora_B[slot]

    def _check_merged_plan(self) -> None:
        merged = self._plan_state.merged_slots
        plan = self._plan_state.plan if self._plan_state.active else None
        if plan is not None and not plan.routes_exactly(merged):
            raise MergeError(
                f"slots {merged} are merged into the base weights; a plan routing rows elsewhere would get "
                "wrong results: unmerge first"
            )

    # --- slot contents ---------------------------------------------------------------------------------------
    def check_slot_tensors(self, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> None:
        """Raise ``AdapterShapeError`` unless A is [rank, d_in] and B is [d_out, rank] with rank <= max."""
        if rank > self.max_rank:
            raise AdapterShapeError(
                f"{self.name}: rank {rank} is above the bank's maximum rank {self.max_rank}"
            )
        want_a, want_b = (rank, self.in_features), (self.out_features, rank)
        if tuple(lora_a.shape) != want_a or tuple(lora_b.shape) != want_b:
            raise AdapterShapeError(
                f"{self.name}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)}, "
                f"expected {want_a} / {want_b}"
            )
        if not (lora_a.is_floating_point() and lora_b.is_floating_point()):
            raise AdapterShapeError(f"{self.name}: LoRA weights must be floating point")

    @torch.no_grad()
    def write_slot(
        self,
        slot: int,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        *,
        scaling: float,
        dropout: float,
    ) -> None:
        """Overwrite a slot in place (zeros + absent when ``lora_a`` is None); call after validation."""
        self._work = None  # the version counters would invalidate it too; this frees its memory now
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.coef_table[slot].zero_()
        if lora_a is None or lora_b is None:
            self.ranks[slot], self.dropouts[slot] = 0, 0.0
            self.dropout_table[slot] = 0.0
            self.present.discard(slot)
            self.slot_params.pop(slot, None)
            return
        r = lora_a.shape[0]
        self.lora_A[slot, :r].copy_(lora_a)
        self.lora_B[slot, :, :r].copy_(lora_b)
        self.coef_table[slot, :r] = scaling
        self.dropout_table[slot] = dropout
        self.ranks[slot], self.dropouts[slot] = r, dropout
        self.present.add(slot)

    def read_slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the slot's ``lora_A [r, d_in]`` and ``lora_B [d_out, r]`` at its own rank."""
        r = self.ranks[slot]
        return self.lora_A[slot, :r].detach().clone(), self.lora_B[slot, :, :r].detach().clone()

    def slot_parameters(self, slot: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Trainable views of the slot's A and B: an optimiser step on them updates the stacks in place."""
        if slot not in self.slot_params:
            self.slot_params[slot] = (nn.Parameter(self.lora_A[slot]), nn.Parameter(self.lora_B[slot]))
        return self.slot_params[slot]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """After ``.to()``/``.cuda()`` moved the stacks, re-point the per-slot parameter views into them."""
        super()._apply(fn, recurse)
        for slot, (param_a, param_b) in self.slot_params.items():
            param_a.data, param_b.data = self.lora_A[slot], self.lora_B[slot]
        return self

    # --- merge -----------------------------------------------------------------------------------------------
    def delta_weight(self, slot: int) -> torch.Tensor:
        """The slot's dense update in fp32, shaped like the base weight ([d_out, d_in], or transposed)."""
        r = self.ranks[slot]
        delta = (self.lora_B[slot, :, :r].float() @ self.lora_A[slot, :r].float()) * self.coef_table[
            slot, 0
        ].float()
        return delta.T if self.kind.fan_in_fan_out else delta  # [d_out, d_in]


def lora_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` with probability ``p`` (training only), as PEFT's ``lora_dropout`` applies it.

    On CPU the keep mask comes from 16-bit slices of 64-bit random words, four elements per draw: the CPU
    generator is slow, and ``F.dropout``'s Bernoulli draws (one mask per adapted module and user, every step)
    took a fifth of a training step on SmolLM2's top 10 layers; these take 40 % of their time. ``p`` is rounded
    to a multiple of 1/65536. Other devices use ``F.dropout``.
    """
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    keep = bits >= round(p * 65536) - 32768  # [*x.shape] bool, True with probability 1 - p
    return x * keep * (1.0 / (1.0 - p))


def _accumulate(out: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``out + h @ up`` in one fused GEMM; in place when no gradient is needed (no extra pass over ``out``)."""
    if out.dtype != h.dtype:  # e.g. a bf16 base with fp32 adapters: compute in the adapters' dtype, then cast
        return out + torch.matmul(h, up).to(out.dtype)
    batched = out.dim() == 3
    if torch.is_grad_enabled():
        return torch.baddbmm(out, h, up) if batched else torch.addmm(out, h, up)
    return out.baddbmm_(h, up) if batched else out.addmm_(h, up)
