"""A small registry of base-layer kinds: how to read the shape of, and merge into, each kind of linear layer.

The bank wraps a base layer without subclassing it, so all it needs from the layer is its shape, its device,
whether it is quantised, and (full precision only) how to read and replace its weight for merging. New kinds
(e.g. another quantisation library) are one :func:`register_base_kind` call, not an ``isinstance`` ladder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BaseLayerKind:
    """How the bank handles one kind of base layer."""

    name: str
    matches: Callable[[nn.Module], bool]
    #: (d_in, d_out) of the layer
    dims: Callable[[nn.Module], tuple[int, int]]
    #: quantised layers cannot be merged into (requantising would be lossy)
    quantized: bool = False
    #: weight stored as [d_in, d_out] (transformers' Conv1D, PEFT's fan_in_fan_out) instead of [d_out, d_in]
    fan_in_fan_out: bool = False

    def device(self, module: nn.Module) -> torch.device:
        return next(module.parameters()).device

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The full-precision weight tensor (only for kinds that are not quantised)."""
        return module.weight.data  # type: ignore[union-attr,return-value]

    def set_weight(self, module: nn.Module, value: torch.Tensor) -> None:
        """Point the layer's weight at ``value`` (no copy, so an unmerge can restore the very same tensor)."""
        module.weight.data = value  # type: ignore[union-attr]


_REGISTRY: list[BaseLayerKind] = []


def register_base_kind(kind: BaseLayerKind) -> None:
    """Register a kind; kinds registered later are tried first (register subclasses after their bases)."""
    _REGISTRY.insert(0, kind)


def base_kind_for(module: nn.Module) -> BaseLayerKind | None:
    """The registered kind that handles ``module``, or None if the bank cannot wrap it."""
    return next((kind for kind in _REGISTRY if kind.matches(module)), None)


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def _conv1d_dims(module: nn.Module) -> tuple[int, int]:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return int(weight.shape[0]), int(weight.shape[1])


def _register_defaults() -> None:
    register_base_kind(BaseLayerKind("linear", lambda m: isinstance(m, nn.Linear), _linear_dims))
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the registry itself does not need it
        pass
    else:
        register_base_kind(
            BaseLayerKind("conv1d", lambda m: isinstance(m, Conv1D), _conv1d_dims, fan_in_fan_out=True)
        )
    try:
        import bitsandbytes as bnb
    except ImportError:  # CPU-only installs without bitsandbytes still get plain layers
        return
    register_base_kind(
        BaseLayerKind("bnb-int8", lambda m: isinstance(m, bnb.nn.Linear8bitLt), _linear_dims, quantized=True)
    )
    register_base_kind(
        BaseLayerKind("bnb-4bit", lambda m: isinstance(m, bnb.nn.Linear4bit), _linear_dims, quantized=True)
    )


def is_linear_like(module: nn.Module) -> bool:
    """True for layers PEFT's ``all-linear`` would pick: any registered kind."""
    return base_kind_for(module) is not None


_register_defaults()
