"""Dense views of quantised base layers: dequantise the layers a training job runs every step once, not per call.

bitsandbytes on CPU computes a 4-bit linear layer by dequantising its whole weight to the compute dtype and then
multiplying, on every call: once in the forward, and again in the backward for the input gradient. A training
job runs the same frozen top layers hundreds of times (the layers below them come from the frozen-prefix cache),
so on CPU that dequantisation is most of a step's time. :func:`dense_views` dequantises each 4-bit layer of
the chosen decoder layers once, for the duration of a ``with`` block, and computes with the result: the same
weight and the same matmul, so the same numbers (a test compares the logits). The model stays 4-bit: the
dense copies are dropped when the block ends, and the original modules are put back even on error.

A serving engine runs every layer at every decoding step, for as long as it lives: :func:`densify` gives it the
same views for good (``serving.factory.build_engine``, ``Settings.serving_dense_mb``). On 2 CPU cores that makes a
SmolLM2-135M decoding step 1.8x faster with one row and 1.3x with sixteen (``tests/benchmarks/bench_dense_serving.py``).

The cost is memory while the block runs (4 bytes per weight in fp32: about 14 MiB per SmolLM2-135M layer), so
the views cover the top layers first, up to ``budget_bytes``. On CUDA bitsandbytes has fused kernels and
memory is the point of QLoRA, so :func:`dense_budget` gives no budget there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.adapters.bank import layer_of

__all__ = [
    "DEFAULT_DENSE_BUDGET_BYTES",
    "DenseView",
    "dense_budget",
    "dense_views",
    "densify",
    "dequantizer_for",
]

logger = logging.getLogger(__name__)

#: the default memory a training job on CPU may spend on dense copies of its top layers
DEFAULT_DENSE_BUDGET_BYTES = 1 << 30


class DenseView(nn.Module):
    """Stands in for a quantised linear layer: its dequantised weight, multiplied as the layer itself would."""

    def __init__(self, original: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()  # ``original`` is not kept as a submodule: the view must not hold a 4-bit layer
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.register_buffer("weight", weight, persistent=False)  # [d_out, d_in]
        bias = getattr(original, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    weight: torch.Tensor  # [d_out, d_in]
    bias: torch.Tensor | None  # [d_out]

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def _bnb_4bit_dequantizer() -> tuple[type[nn.Module], Callable[[nn.Module], torch.Tensor]] | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None

    def dequantize(module: nn.Module) -> torch.Tensor:
        weight: Any = module.weight  # a bnb Params4bit
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        # bitsandbytes multiplies in the layer's compute dtype (the input's dtype when unset)
        dtype: torch.dtype = getattr(module, "compute_dtype", None) or weight.quant_state.dtype
        return dense.to(dtype)

    return bnb.nn.Linear4bit, dequantize


def dequantizer_for(module: nn.Module) -> Callable[[nn.Module], torch.Tensor] | None:
    """How to dequantise ``module`` (None when it is not a layer this module knows how to view densely)."""
    found = _bnb_4bit_dequantizer()
    if found is not None and isinstance(module, found[0]):
        return found[1]
    return None


def dense_budget(device: torch.device, budget_bytes: int | None = None) -> int:
    """The bytes a job on ``device`` may spend on dense views: ``budget_bytes`` (default 1 GiB) on CPU, 0 on CUDA."""
    if device.type != "cpu":
        return 0
    return DEFAULT_DENSE_BUDGET_BYTES if budget_bytes is None else max(0, budget_bytes)


@contextmanager
def dense_views(model: nn.Module, *, from_layer: int, budget_bytes: int) -> Iterator[int]:
    """Within the block, every 4-bit linear layer of decoder layers ``>= from_layer`` computes from a dense copy.

    Layers are taken from the top down while their dense weights fit in ``budget_bytes``; yields the number of
    modules viewed (0 when the model has no 4-bit layers or the budget is 0). The original modules are restored
    when the block exits, whatever happens in it.
    """
    swapped = _swap_in_dense(model, from_layer=from_layer, budget_bytes=budget_bytes)
    try:
        yield len(swapped)
    finally:
        _restore(swapped)


def densify(model: nn.Module, *, budget_bytes: int, from_layer: int = 0) -> int:
    """Dense views for the rest of the model's life: what a serving engine, which owns its model, computes with.

    The same views as :func:`dense_views` (top layers first, within ``budget_bytes``; the same numbers), but
    nothing is restored: the 4-bit modules replaced are released. Returns the number of modules viewed.
    """
    return len(_swap_in_dense(model, from_layer=from_layer, budget_bytes=budget_bytes))


Swapped = list[tuple[nn.Module, str, nn.Module]]


def _swap_in_dense(model: nn.Module, *, from_layer: int, budget_bytes: int) -> Swapped:
    """Put dense views in place of the 4-bit layers chosen (see ``dense_views``); (parent, name, original) of
    each. If a dequantisation fails, the layers swapped so far are put back before the error propagates."""
    candidates: list[tuple[int, nn.Module, str, nn.Module, Callable[[nn.Module], torch.Tensor]]] = []
    if budget_bytes > 0:
        for parent_name, parent in model.named_modules():
            for child_name, child in parent.named_children():
                dequantize = dequantizer_for(child)
                layer = layer_of(f"{parent_name}.{child_name}")
                if dequantize is not None and layer is not None and layer >= from_layer:
                    candidates.append((layer, parent, child_name, child, dequantize))
    candidates.sort(key=lambda c: -c[0])
    swapped: Swapped = []
    spent = 0
    try:
        for _layer, parent, name, child, dequantize in candidates:
            size = _dense_bytes(child)
            if spent + size > budget_bytes:
                break
            with torch.no_grad():
                view = DenseView(child, dequantize(child))
            setattr(parent, name, view)
            swapped.append((parent, name, child))
            spent += size
    except BaseException:
        _restore(swapped)
        raise
    if swapped:
        logger.debug("dense views of %d quantised layers (%.0f MiB)", len(swapped), spent / 2**20)
    return swapped


def _restore(swapped: Swapped) -> None:
    for parent, name, child in reversed(swapped):
        setattr(parent, name, child)


def _dense_bytes(module: nn.Module) -> int:
    in_features, out_features = int(module.in_features), int(module.out_features)  # type: ignore[arg-type]
    return in_features * out_features * 4
