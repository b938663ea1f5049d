"""The adapter bank layer: many LoRA adapters on one frozen base layer, PEFT-format read/write.

Public API (import torch-heavy names from here or from the submodules):

- ``inject_bank(model_or_backbone, target_modules=..., n_slots=..., max_rank=..., dtype=...) -> AdapterBank``
  (``serving_dtype(device)``: the dtype a serving bank uses, bf16 on CUDA and fp32 on CPU)
- ``AdapterBank``: ``routing(plan)``, ``load_slot``/``init_slot``/``evict_slot``, ``slot_info``,
  ``slot_state_dict`` (PEFT key names), ``trainable_parameters(slots)``, ``merge``/``unmerge``
- ``RoutingPlan.from_rows([[(slot, weight), ...], ...])`` / ``RoutingPlan.single([slot | None, ...])``
- ``save_slot`` / ``load_slot_from_dir``: PEFT adapter folders
- ``peft_format``: validation of a PEFT folder without a model (no torch needed)

Importing this package does not import torch; the names above are loaded on first use.

Its room (docs/architecture.md): the ML layer's adapter-bank math, above ``backbone`` and the registry's PEFT
format, below routing, serving, training and QA. It knows slots, tensors and PEFT files, never versions, users
or jobs.
"""

from __future__ import annotations

from typing import Any

from lorafleet._exports import lazy_export

_EXPORTS = {
    "AdapterBank": "lorafleet.adapters.bank",
    "BankLinear": "lorafleet.adapters.linear",
    "BaseLayerKind": "lorafleet.adapters.layers",
    "register_base_kind": "lorafleet.adapters.layers",
    "RoutingPlan": "lorafleet.adapters.routing",
    "SlotConfig": "lorafleet.adapters.slots",
    "SlotInfo": "lorafleet.adapters.slots",
    "ALL_LINEAR": "lorafleet.adapters.injection",
    "inject_bank": "lorafleet.adapters.injection",
    "remove_bank": "lorafleet.adapters.injection",
    "serving_dtype": "lorafleet.adapters.injection",
    "find_target_modules": "lorafleet.adapters.injection",
    "save_slot": "lorafleet.adapters.serialization",
    "load_slot_from_dir": "lorafleet.adapters.serialization",
    "SavedAdapter": "lorafleet.adapters.serialization",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: the registry imports ``lorafleet.registry.peft_format`` without paying for torch."""
    return lazy_export(__name__, _EXPORTS, name)
