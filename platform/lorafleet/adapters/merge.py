"""Merging one slot into full-precision base weights, and undoing it exactly (an undoable stack, as PEFT's).

A merge computes every layer's new weight and checks it for NaN/inf before touching any weight. The original
weight tensors are kept (not recomputed by subtraction), so an unmerge restores them bit for bit. Quantised
bases (bitsandbytes 4-bit / 8-bit) are refused: requantising a merged weight would be lossy and irreversible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorafleet.errors import MergeError, NonFiniteError, NotFoundError

if TYPE_CHECKING:
    from lorafleet.adapters.bank import AdapterBank
    from lorafleet.adapters.linear import BankLinear


def merge_slot(bank: AdapterBank, slot: int) -> None:
    """Add the slot's ``scaling * B @ A`` to each base weight it targets; while merged, forwards add no delta."""
    info = bank.slot_info(slot)
    if info is None:
        raise NotFoundError(f"slot {slot} is empty: nothing to merge")
    if slot in bank.merged_slots:
        raise MergeError(f"slot {slot} is already merged")
    layers = [bank.layers[name] for name in info.modules]
    quantized = sorted({layer.kind.name for layer in layers if layer.kind.quantized})
    if quantized:
        raise MergeError(
            f"cannot merge into a quantised base ({', '.join(quantized)}): requantising would be lossy; "
            "load the backbone in fp32 or bf16 to merge, or serve the adapter unmerged"
        )
    updates: list[tuple[BankLinear, torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        original = layer.kind.weight(layer.base_layer)
        merged = original.float() + layer.delta_weight(slot).to(original.device)  # [d_out, d_in] fp32
        if not bool(torch.isfinite(merged).all()):
            raise NonFiniteError(
                f"merging slot {slot} into {layer.name} gives NaN or inf; no weight was changed"
            )
        updates.append((layer, original, merged.to(original.dtype)))
    for layer, original, merged in updates:
        layer.merged.append((slot, original))
        layer.kind.set_weight(layer.base_layer, merged)
    bank._plan_state.merged_slots.append(slot)


def unmerge_last(bank: AdapterBank) -> int:
    """Restore the weights saved by the last merge (the very same tensors) and return that slot."""
    if not bank.merged_slots:
        raise MergeError("no slot is merged")
    slot = bank._plan_state.merged_slots[-1]
    for layer in bank.layers.values():
        if layer.merged and layer.merged[-1][0] == slot:
            _, original = layer.merged.pop()
            layer.kind.set_weight(layer.base_layer, original)
    bank._plan_state.merged_slots.pop()
    return slot


def unmerge_all(bank: AdapterBank) -> list[int]:
    """Undo every merge, newest first; returns the slots in the order they were unmerged."""
    return [unmerge_last(bank) for _ in range(len(bank.merged_slots))]
