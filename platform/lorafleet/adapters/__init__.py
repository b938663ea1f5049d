"""The adapter bank layer: many LoRA adapters on one frozen base layer, PEFT-format read/write.

Public API (import torch-heavy names from here or from the submodules):

- ``inject_bank(model_or_backbone, target_modules=..., n_slots=..., max_rank=..., dtype=...) -> AdapterBank``
  (``serving_dtype(device)``: the dtype a serving bank uses, bf16 on CUDA and fp32 on CPU)
- ``AdapterBank``: ``use(plan)``, ``load_slot``/``init_slot``/``evict_slot``, ``slot_info``,
  ``slot_state_dict`` (PEFT key names), ``trainable_parameters(slots)``, ``merge``/``unmerge``
- ``SlotPlan.from_rows([[(slot, weight), ...], ...])`` / ``SlotPlan.single([slot | None, ...])``
- ``save_slot`` / ``load_slot_from_dir``: PEFT adapter folders
- ``peft_format``: validation of a PEFT folder without a model (no torch needed)

Importing this package does not import torch; the names above are loaded on first use.

Its room (docs/architecture.md): the ML layer's adapter-bank math, above ``backbone`` and the registry's PEFT
format, below routing, serving, training and QA. It knows slots, tensors and PEFT files, never versions, users
or jobs.
"""

from __future__ import annotations

from lorafleet._exports import lazy_export

# The registry imports ``lorafleet.registry.peft_format`` without paying for torch.
__getattr__, __dir__, __all__ = lazy_export(
    __name__,
    {
        "lorafleet.adapters.bank": ("AdapterBank",),
        "lorafleet.adapters.linear": ("BankLinear",),
        "lorafleet.adapters.layers": ("BaseLayerKind", "register_base_kind"),
        "lorafleet.adapters.plan": ("SlotPlan",),
        "lorafleet.adapters.slots": ("SlotConfig", "SlotInfo"),
        "lorafleet.adapters.injection": (
            "ALL_LINEAR",
            "inject_bank",
            "remove_bank",
            "serving_dtype",
            "find_target_modules",
        ),
        "lorafleet.adapters.serialization": ("save_slot", "load_slot_from_dir", "SavedAdapter"),
    },
)
