"""Weight sanity (``lorafleet.registry.weight_sanity``) against real training: adapters the project's trainer
produces on the tiny backbone, at the default config and at an aggressive one, sit far inside the default bounds.

The refusals of absurd weights are in the unit tier (tests/unit/registry/test_weight_sanity.py)."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.adapters import inject_bank
from lorafleet.backbone import build_tiny_backbone, load_backbone
from lorafleet.qa.policy import QAPolicy
from lorafleet.registry.weight_sanity import WeightBounds, measure_weights, weight_problems
from lorafleet.training import synthetic
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import build_dataset
from lorafleet.training.trainer import SlotTraining, train_slots

#: how far inside every default bound an adapter trained at the defaults must sit (the bounds are meant to be
#: orders of magnitude above what training produces; docs/qa.md has the measured figures)
HEADROOM = 100.0


#: each figure ``measure_weights`` gives a module, and the ``WeightBounds`` field that bounds it
BOUND_OF_FIGURE = {
    "scaling": "max_scaling",
    "a_max": "max_abs_factor",
    "b_max": "max_abs_factor",
    "a_norm": "max_factor_norm",
    "b_norm": "max_factor_norm",
    "delta_max": "max_abs_delta",
    "delta_norm": "max_delta_norm",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[dict[str, Any], dict]]]:
    """Adapters trained by ``train_slots`` on the real tiny backbone: two users at the default config, and one
    at an aggressive one (the highest learning rate ``TrainingConfig`` allows, rank 16, alpha 64, every layer)."""
    folder = build_tiny_backbone(tmp_path_factory.mktemp("weight-sanity"))
    backbone = load_backbone(folder, quantization="fp32", device="cpu")
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=3, max_rank=16)
    runs = {
        "default": (TrainingConfig(anchor_ratio=0.0, max_steps=30), [0, 1]),
        "aggressive": (
            TrainingConfig(
                anchor_ratio=0.0, learning_rate=1e-2, max_steps=60, rank=16, alpha=64.0, layers="all"
            ),
            [2],
        ),
    }
    out: dict[str, list[tuple[dict[str, Any], dict]]] = {}
    for name, (config, slots) in runs.items():
        tasks = []
        for slot in slots:
            raw = synthetic.make_user_records(f"user-{slot}", round=1, n_records=48)
            dataset = build_dataset(synthetic.to_feedback_records(raw), config=config)
            bank.init_slot(slot, config.slot_config(layer_names=list(bank.layers)), seed=slot)
            tasks.append(SlotTraining(slot, f"user-{slot}", dataset.train, dataset.holdout))
        results = train_slots(bank, backbone.tokenizer, tasks, config)
        assert all(r.metrics["holdout_loss_after"] < r.metrics["holdout_loss_before"] for r in results)
        peft_config = {"r": config.rank, "lora_alpha": config.alpha}
        out[name] = [(peft_config, bank.slot_state_dict(slot)) for slot in slots]
    return out


def test_adapters_trained_at_the_defaults_sit_orders_of_magnitude_inside_every_bound(
    trained: dict[str, list[tuple[dict[str, Any], dict]]],
) -> None:
    bounds = WeightBounds()
    for config, tensors in trained["default"]:
        modules = measure_weights(config, tensors)
        assert len(modules) == 14  # every linear layer of the 2-layer tiny model
        assert weight_problems(config, tensors, WeightBounds()) == []
        for module in modules:
            for figure, bound in BOUND_OF_FIGURE.items():
                value = getattr(module, figure)
                assert 0 < value <= getattr(bounds, bound) / HEADROOM, (module.module, figure, value)


def test_an_aggressively_trained_adapter_passes_too(
    trained: dict[str, list[tuple[dict[str, Any], dict]]],
) -> None:
    ((config, tensors),) = trained["aggressive"]
    assert weight_problems(config, tensors, WeightBounds()) == []
    assert weight_problems(config, tensors, QAPolicy().weight_bounds()) == []
