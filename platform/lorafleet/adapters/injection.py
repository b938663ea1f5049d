"""Injecting an adapter bank into a model by target module names (``q_proj``, ``v_proj``, ... or ``all-linear``).

Each matched base layer is replaced, in its parent, by a ``BankLinear`` that wraps it. Every name asked for must
match at least one module, and every matched module must be a kind the bank can wrap: an adapter that would
match nothing is an error, never a silent base-only fallback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorafleet.adapters.bank import AdapterBank, module_matches
from lorafleet.adapters.layers import base_kind_for
from lorafleet.adapters.linear import BankLinear
from lorafleet.adapters.merge import unmerge_all
from lorafleet.adapters.plan import PlanState
from lorafleet.errors import ConflictError, TargetModuleError, ValidationError

if TYPE_CHECKING:
    from lorafleet.backbone import Backbone

ALL_LINEAR = "all-linear"


def find_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules to wrap, by PEFT's rules (list: name or ``.suffix``; string: regex; ``all-linear``).

    ``all-linear`` takes every wrappable linear layer except the output embedding (``lm_head``), as PEFT does.
    """
    names = {name: module for name, module in model.named_modules() if name}
    if target_modules == ALL_LINEAR:
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        found = [n for n, m in names.items() if base_kind_for(m) is not None and m is not output]
    elif isinstance(target_modules, str):
        found = [n for n in names if module_matches(n, target_modules)]
    else:
        missing = [t for t in target_modules if not any(module_matches(n, [t]) for n in names)]
        if missing:
            raise TargetModuleError(f"target modules {missing} match no module of the model")
        found = [n for n in names if module_matches(n, target_modules)]
    if not found:
        raise TargetModuleError(f"target modules {target_modules!r} match no module of the model")
    unsupported = [f"{n} ({type(names[n]).__name__})" for n in found if base_kind_for(names[n]) is None]
    if unsupported:
        raise TargetModuleError(
            f"target modules match layers the bank cannot wrap: {', '.join(unsupported[:5])}"
        )
    return sorted(found)


def inject_bank(
    model_or_backbone: nn.Module | Backbone,
    *,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    n_slots: int,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    fingerprint: str | None = None,
    base_model_name: str | None = None,
) -> AdapterBank:
    """Wrap the target layers of a model (or a ``Backbone``, whose fingerprint is then used) in bank layers.

    The model is changed in place; the base layers stay frozen and are reachable as ``layer.base_layer``.
    """
    model, fingerprint, base_model_name = _unpack(model_or_backbone, fingerprint, base_model_name)
    if n_slots < 1 or max_rank < 1:
        raise ValidationError(f"n_slots and max_rank must be >= 1, got {n_slots} and {max_rank}")
    if any(isinstance(m, BankLinear) for m in model.modules()):
        raise ConflictError("this model already has an adapter bank")
    plan_state = PlanState()
    layers: dict[str, BankLinear] = {}
    for name in find_target_modules(model, target_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        kind = base_kind_for(base)
        if kind is None:  # find_target_modules refuses these already; this keeps the type checker informed
            raise TargetModuleError(f"{name} ({type(base).__name__}) cannot be wrapped")
        base.requires_grad_(False)
        layer = BankLinear(
            base,
            kind=kind,
            n_slots=n_slots,
            max_rank=max_rank,
            plan_state=plan_state,
            dtype=dtype,
            name=name,
        )
        layer.train(base.training)  # a new module starts in training mode; follow the model's mode
        setattr(parent, child, layer)
        layers[name] = layer
    return AdapterBank(
        model,
        layers,
        n_slots=n_slots,
        max_rank=max_rank,
        plan_state=plan_state,
        fingerprint=fingerprint,
        base_model_name=base_model_name,
    )


def serving_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a serving bank stores and computes its adapters in on ``device``.

    CUDA: bf16 (fp16 on devices without bf16), the dtype the 4-bit layers compute in, at half the memory and half
    the bytes per decode step of fp32. CPU: fp32, because there bf16 and fp16 batched matmuls measured slower than
    fp32 (``tests/benchmarks/bench_decode.py``: the rows' LoRA matmuls are memory-bound, but CPU half-precision
    kernels convert element by element). Training banks keep ``inject_bank``'s fp32 default (exact updates).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextmanager
def model_base_only(model: nn.Module) -> Iterator[None]:
    """Forwards of ``model`` inside the block skip every adapter, for code that holds the model but not its
    bank (a model without a bank is unaffected); the bank's plan in force is restored afterwards."""
    layer = next((m for m in model.modules() if isinstance(m, BankLinear)), None)
    if layer is None:
        yield
        return
    state = layer._plan_state
    saved = (state.active, state.plan)
    state.active, state.plan = True, None
    try:
        yield
    finally:
        state.active, state.plan = saved


def remove_bank(bank: AdapterBank) -> nn.Module:
    """Put the original base layers back (unmerging first if needed) and return the bare model."""
    unmerge_all(bank)
    for name, layer in bank.layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(bank.model.get_submodule(parent_name), child, layer.base_layer)
    bank.layers.clear()
    return bank.model


def _unpack(
    obj: nn.Module | Backbone, fingerprint: str | None, base_model_name: str | None
) -> tuple[nn.Module, str | None, str | None]:
    if isinstance(obj, nn.Module):
        return obj, fingerprint, base_model_name
    return obj.model, fingerprint or obj.fingerprint.digest, base_model_name or obj.source
