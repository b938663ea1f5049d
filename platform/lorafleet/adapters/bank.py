"""``AdapterBank``: the bank layers of one model, with slot management, the routing context and training views.

One frozen backbone; on each adapted linear layer a bank of LoRA slots (see ``linear.BankLinear``). A forward
carries rows for many adapters at once: ``with bank.use(plan): model(...)``. Slots are loaded, initialised
and evicted in place, without rebuilding the model. Create a bank with :func:`lorafleet.adapters.inject_bank`.

Training (how a trainer keeps slots that are not in a batch untouched): build the optimiser over
``bank.trainable_parameters(slots)`` (per-slot parameters, views into the stacks) and clear gradients with
``optimizer.zero_grad(set_to_none=True)`` (the default). A slot that is not in a batch is not in the autograd
graph, so its gradients stay ``None`` and torch optimisers (SGD, Adam, AdamW, including weight decay and
momentum) skip it entirely. Call ``backward()`` inside the ``use`` block (recomputation under gradient
checkpointing reads the plan). Trained values live in the slot itself: export them with ``slot_state_dict`` or
``serialization.save_slot``; after ``load_slot(..., replace=True)`` on a slot being trained, reset that slot's
optimiser state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorafleet.adapters.merge import merge_slot, unmerge_last
from lorafleet.adapters.plan import PartsPlan, PlanState, SlotPlan
from lorafleet.adapters.slots import SlotConfig, SlotInfo
from lorafleet.errors import (
    AdapterFormatError,
    BackboneMismatchError,
    CapacityError,
    ConflictError,
    MergeError,
    NonFiniteError,
    NotFoundError,
    TargetModuleError,
    ValidationError,
)
from lorafleet.registry.peft_format import layer_of

if TYPE_CHECKING:
    from lorafleet.adapters.linear import BankLinear

#: PEFT's saved key names: ``base_model.model.<module path>.lora_A.weight`` (an adapter name may follow lora_A)
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def peft_key(module: str, which: str) -> str:
    """PEFT's key for a module's ``lora_A``/``lora_B`` weight (``which`` is "A" or "B")."""
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def group_peft_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": tensor, "B": tensor}}`` from PEFT keys; anything but LoRA A/B weights is refused."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise AdapterFormatError(
                f"unsupported tensor {key!r}: only LoRA lora_A/lora_B weights are accepted"
            )
        grouped.setdefault(match["module"], {})[match["ab"]] = tensor
    for module, pair in grouped.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(
                f"module {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B"
            )
    return grouped


def on_layers(names: Iterable[str], layers: str | Iterable[int] | None) -> list[str]:
    """The module names that sit on ``layers``: ``"top N"`` (the N highest layers present; all of them when
    there are fewer), layer indices, or None (every name). Names outside the layer stack are left out."""
    names = list(names)
    if layers is None:
        return names
    indexed = {n: layer_of(n) for n in names}
    present = sorted({i for i in indexed.values() if i is not None})
    if isinstance(layers, str):
        wanted = set(present[-int(layers.split()[1]) :]) if present else set()
    else:
        wanted = set(layers)
    return [n for n in names if indexed[n] in wanted]


def module_matches(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex on the full name; a list matches names equal to or ending in ``.item``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


class AdapterBank:
    """All bank layers of one model (module path -> ``BankLinear``) and the state of its slots."""

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, BankLinear],
        *,
        n_slots: int,
        max_rank: int,
        plan_state: PlanState,
        fingerprint: str | None = None,
        base_model_name: str | None = None,
    ) -> None:
        self.model = model
        self.layers: dict[str, BankLinear] = dict(sorted(layers.items()))
        self.n_slots, self.max_rank = n_slots, max_rank
        #: digest of the backbone fingerprint; adapters recording another one are refused
        self.fingerprint = fingerprint
        self.base_model_name = base_model_name
        self._plan_state = plan_state
        self._slots: dict[int, SlotInfo] = {}

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).lora_A.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the slot stacks of every layer (what the bank costs on its device, whatever is loaded)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers.values()
            for t in (layer.lora_A, layer.lora_B, layer.coef_table, layer.dropout_table)
        )

    def drop_cached_work(self) -> None:
        """Free every layer's gathered rows of the last plan (``BankLinear.row_work``); rebuilt when needed."""
        for layer in self.layers.values():
            layer.drop_cached_work()

    @property
    def merged_slots(self) -> tuple[int, ...]:
        """Slots merged into the base weights, oldest first (unmerge pops the last)."""
        return tuple(self._plan_state.merged_slots)

    # --- plans ----------------------------------------------------------------------------------------------
    def current_plan(self) -> SlotPlan | PartsPlan | None:
        """The plan of the innermost ``use`` block (None = base only); raises outside any such block."""
        return self._plan_state.current()

    @contextmanager
    def use(self, plan: SlotPlan | PartsPlan | None) -> Iterator[SlotPlan | PartsPlan | None]:
        """Use ``plan`` for every forward inside the block (also every step of ``generate``); None = base only.
        A ``PartsPlan`` routes a flattened input part by part (continuous batching's fused step)."""
        if plan is not None:
            self._check_plan(plan)
        saved = (self._plan_state.active, self._plan_state.plan)
        self._plan_state.active, self._plan_state.plan = True, plan
        try:
            yield plan
        finally:
            self._plan_state.active, self._plan_state.plan = saved

    def base_only(self) -> AbstractContextManager[SlotPlan | PartsPlan | None]:
        """Forwards inside the block skip every adapter (the frozen base model alone)."""
        return self.use(None)

    def _check_plan(self, plan: SlotPlan | PartsPlan) -> None:
        bad = [s for s in plan.used_slots if s >= self.n_slots]
        if bad:
            raise ValidationError(f"routing plan uses slots {bad}; the bank has {self.n_slots} slots")
        empty = [s for s in plan.used_slots if s not in self._slots]
        if empty:
            raise ValidationError(f"routing plan uses empty slots {empty}: load an adapter into them first")

    # --- slots -----------------------------------------------------------------------------------------------
    def slot_info(self, slot: int) -> SlotInfo | None:
        """What slot ``slot`` holds, or None when it is empty."""
        self._check_index(slot)
        return self._slots.get(slot)

    def occupied(self) -> dict[int, SlotInfo]:
        """Every loaded slot, by index."""
        return dict(sorted(self._slots.items()))

    def free_slot(self) -> int:
        """The lowest empty slot; ``CapacityError`` when the bank is full."""
        for slot in range(self.n_slots):
            if slot not in self._slots:
                return slot
        raise CapacityError(f"all {self.n_slots} slots of the adapter bank are occupied")

    def load_slot(
        self, slot: int, tensors: Mapping[str, torch.Tensor], config: SlotConfig, *, replace: bool = False
    ) -> SlotInfo:
        """Load LoRA weights (PEFT key names) into a slot; everything is validated before anything is written."""
        self._check_writable(slot, replace=replace)
        config.check_fits(self.max_rank)
        self.check_fingerprint(config.backbone_fingerprint)
        grouped = group_peft_tensors(tensors)
        unknown = sorted(set(grouped) - set(self.layers))
        if not grouped or unknown:
            raise TargetModuleError(self._target_message(unknown or ["(no LoRA tensors)"]))
        for module, pair in grouped.items():
            self.layers[module].check_slot_tensors(pair["A"], pair["B"], config.rank)
            if not all(bool(torch.isfinite(t).all()) for t in pair.values()):
                raise NonFiniteError(f"LoRA weights of {module!r} contain NaN or infinity")
        for name, layer in self.layers.items():
            pair = grouped.get(name, {})
            layer.write_slot(
                slot, pair.get("A"), pair.get("B"), scaling=config.scaling, dropout=config.dropout
            )
        self._slots[slot] = SlotInfo(slot, config, tuple(sorted(grouped)))
        return self._slots[slot]

    def init_slot(self, slot: int, config: SlotConfig, *, seed: int = 0, replace: bool = False) -> SlotInfo:
        """A fresh adapter for training, initialised as PEFT does (A Kaiming-uniform, B zero, so delta = 0)."""
        targets = config.target_modules
        modules = [n for n in self.layers if targets is None or module_matches(n, targets)]
        modules = on_layers(modules, config.layers)
        if not modules:
            raise TargetModuleError(
                f"target modules {targets} on layers {config.layers or 'all'} match no layer of the bank "
                f"({self._layer_summary()})"
            )
        generator = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for name in modules:
            layer = self.layers[name]
            bound = 1.0 / math.sqrt(
                layer.in_features
            )  # kaiming_uniform_(a=sqrt(5)) on [r, d_in], as nn.Linear
            lora_a = (torch.rand(config.rank, layer.in_features, generator=generator) * 2 - 1) * bound
            tensors[peft_key(name, "A")] = lora_a  # [r, d_in]
            tensors[peft_key(name, "B")] = torch.zeros(layer.out_features, config.rank)  # [d_out, r]
        return self.load_slot(slot, tensors, config, replace=replace)

    def evict_slot(self, slot: int) -> None:
        """Empty a slot (its weights become zeros, its training views are dropped)."""
        self._check_index(slot)
        if slot not in self._slots:
            raise NotFoundError(f"slot {slot} is empty")
        if slot in self._plan_state.merged_slots:
            raise MergeError(f"slot {slot} is merged into the base weights: unmerge it before evicting")
        for layer in self.layers.values():
            layer.write_slot(slot, None, None, scaling=0.0, dropout=0.0)
        del self._slots[slot]

    def slot_state_dict(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's weights in PEFT key names at the slot's rank (copies, CPU)."""
        info = self._require(slot)
        out: dict[str, torch.Tensor] = {}
        for name in info.modules:
            lora_a, lora_b = self.layers[name].read_slot(slot)
            out[peft_key(name, "A")], out[peft_key(name, "B")] = lora_a.cpu(), lora_b.cpu()
        return out

    def set_slot_config(self, slot: int, config: SlotConfig) -> SlotInfo:
        """Replace a slot's recorded config fields that do not change compute (name, content hash)."""
        info = self._require(slot)
        if (config.rank, config.scaling, config.dropout) != (
            info.config.rank,
            info.config.scaling,
            info.config.dropout,
        ):
            raise ValidationError(
                "set_slot_config may only change labels; load the slot again to change weights"
            )
        self._slots[slot] = replace(info, config=config)
        return self._slots[slot]

    # --- training --------------------------------------------------------------------------------------------
    def trainable_parameters(self, slots: Iterable[int]) -> list[nn.Parameter]:
        """Per-slot trainable views (A then B, per layer) of ``slots``: give exactly these to the optimiser."""
        return [p for group in self.parameter_groups(slots) for p in group["params"]]

    def parameter_groups(self, slots: Iterable[int]) -> list[dict[str, Any]]:
        """One optimiser parameter group per slot (``{"params": [...], "slot": s}``), for per-slot settings."""
        groups: list[dict[str, Any]] = []
        for slot in slots:
            info = self._require(slot)
            if slot in self._plan_state.merged_slots:
                raise MergeError(f"slot {slot} is merged into the base weights: unmerge it before training")
            params: list[nn.Parameter] = []
            for name in info.modules:
                params.extend(self.layers[name].slot_parameters(slot))
            # once handed out, the weights may change: the file's content hash no longer describes them
            self._slots[slot] = replace(info, config=replace(info.config, content_hash=None))
            groups.append({"params": params, "slot": slot})
        return groups

    def release_parameters(self, slots: Iterable[int] | None = None) -> None:
        """Drop the trainable views of ``slots`` (all when None); the trained values stay in the slots."""
        for layer in self.layers.values():
            for slot in list(layer.slot_params if slots is None else slots):
                layer.slot_params.pop(slot, None)

    # --- merge -----------------------------------------------------------------------------------------------
    def merge(self, slot: int) -> None:
        """Merge a slot into full-precision base weights (NaN-checked first; ``MergeError`` on 4/8-bit bases)."""
        merge_slot(self, slot)

    def unmerge(self) -> int:
        """Undo the last merge, restoring the saved base weights bit for bit; returns the slot."""
        return unmerge_last(self)

    # --- checks ----------------------------------------------------------------------------------------------
    def check_fingerprint(self, fingerprint: str | None) -> None:
        """``BackboneMismatchError`` when an adapter records a backbone other than this bank's."""
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise BackboneMismatchError(
                f"adapter was trained on backbone {fingerprint[:16]}..., this bank is on {self.fingerprint[:16]}..."
            )

    def _require(self, slot: int) -> SlotInfo:
        self._check_index(slot)
        if slot not in self._slots:
            raise NotFoundError(f"slot {slot} is empty")
        return self._slots[slot]

    def _check_index(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.n_slots:
            raise ValidationError(f"slot must be an int in [0, {self.n_slots}), got {slot!r}")

    def _check_writable(self, slot: int, *, replace: bool) -> None:
        self._check_index(slot)
        if slot in self._plan_state.merged_slots:
            raise MergeError(f"slot {slot} is merged into the base weights: unmerge it first")
        if slot in self._slots and not replace:
            raise ConflictError(f"slot {slot} is occupied; evict it first or pass replace=True")

    def _layer_summary(self) -> str:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in self.layers})
        return f"{len(self.layers)} layers: {', '.join(leaves)}"

    def _target_message(self, unknown: list[str]) -> str:
        in_model = dict(self.model.named_modules())
        detail = ", ".join(
            f"{m} ({'not adapted by the bank' if m in in_model else 'not in the model'})" for m in unknown[:5]
        )
        return f"adapter tensors target modules the bank does not hold: {detail}; bank has {self._layer_summary()}"
