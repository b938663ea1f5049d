"""Weight sanity (``lorafleet.registry.weight_sanity``): finite but absurd weights (1e30 in a factor, a 1e30
``lora_alpha``, a huge update from moderate factors) are refused with the tensor or field named.

That adapters the project's trainer produces sit far inside the default bounds needs real training runs: the
integration tier checks it (tests/integration/training/test_weight_sanity_trained.py)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.errors import ValidationError, WeightBoundsError
from lorafleet.qa.policy import QAPolicy
from lorafleet.registry.weight_sanity import (
    WeightBounds,
    check_weight_bounds,
    lora_scaling,
    measure_weights,
    weight_problems,
)

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def _adapter(a: float = 0.1, b: float = 0.01, *, rank: int = 4, d: int = 8) -> dict[str, torch.Tensor]:
    return {
        f"{MODULE}.lora_A.weight": torch.full((rank, d), a),
        f"{MODULE}.lora_B.weight": torch.full((d, rank), b),
    }


def test_1e30_weights_are_refused_naming_the_tensor() -> None:
    tensors = _adapter()
    tensors[f"{MODULE}.lora_A.weight"][0, 0] = 1e30  # finite in fp32
    named = r"largest \|value\| above the bound 1000 in .*q_proj\.lora_A\.weight: 1e\+30"
    with pytest.raises(WeightBoundsError, match=named):
        check_weight_bounds({"r": 4, "lora_alpha": 8}, tensors, WeightBounds())


def test_a_1e30_alpha_is_refused_naming_the_field() -> None:
    config = {"r": 4, "lora_alpha": 1e30}
    assert lora_scaling(config) == pytest.approx(2.5e29)
    (problem,) = weight_problems(config, _adapter(), WeightBounds())
    assert problem.startswith("adapter_config.json: lora_alpha=1e+30 with r=4 gives scaling 2.5e+29")
    assert problem.endswith("above the bound 10000")
    rslora = {"r": 4, "lora_alpha": 8, "use_rslora": True}  # PEFT's rsLoRA scaling: alpha / sqrt(r)
    assert lora_scaling(rslora) == pytest.approx(4.0)


def test_a_huge_update_from_moderate_factors_is_refused() -> None:
    """|A| = |B| = 20 is within the factor bound, but the update scaling * B @ A is 2 * 4 * 400 = 3200 in each
    of its 8 x 8 entries: a norm of 25600, 12800 per rank component."""
    problems = weight_problems({"r": 4, "lora_alpha": 8}, _adapter(20.0, 20.0), WeightBounds())
    assert problems == [
        f"largest |value| of the update above the bound 1000 in {MODULE}.scaling*B@A: 3200",
        f"update norm per rank (||scaling*B@A||_F/sqrt(r)) above the bound 10000 in {MODULE}.scaling*B@A: 1.28e+04",
    ]
    loose = WeightBounds(max_abs_delta=1e4, max_delta_norm=2e4)
    assert weight_problems({"r": 4, "lora_alpha": 8}, _adapter(20.0, 20.0), loose) == []


def test_bounds_are_positive_finite_and_come_from_the_qa_policy() -> None:
    with pytest.raises(ValidationError, match="max_scaling"):
        WeightBounds(max_scaling=0.0)
    with pytest.raises(ValidationError, match="max_abs_delta"):
        WeightBounds(max_abs_delta=float("inf"))
    with pytest.raises(ValidationError, match="max_abs_update"):
        QAPolicy(max_abs_update=-1.0)
    policy = QAPolicy(max_abs_lora_weight=5.0, max_update_norm_per_rank=7.0)
    assert policy.weight_bounds() == WeightBounds(max_abs_factor=5.0, max_delta_norm=7.0)
    assert QAPolicy.from_mapping({"max_lora_scaling": 50}).weight_bounds().max_scaling == 50


def test_a_bf16_adapter_is_measured_in_float64() -> None:
    tensors = {k: v.to(torch.bfloat16) for k, v in _adapter(0.5, 0.25).items()}
    (module,) = measure_weights({"r": 4, "lora_alpha": 8}, tensors)
    assert (module.a_max, module.b_max, module.delta_max) == (0.5, 0.25, pytest.approx(2 * 4 * 0.125))


def test_factors_that_do_not_fit_together_are_left_to_the_shape_checks() -> None:
    tensors = {**_adapter(), f"{MODULE}.lora_B.weight": torch.full((8, 3), 0.01)}  # rank 4 against 3
    (module,) = measure_weights({"r": 4, "lora_alpha": 8}, tensors)
    assert module.a_max == pytest.approx(0.1) and module.delta_max != module.delta_max  # NaN: not computed
    assert weight_problems({"r": 4, "lora_alpha": 8}, tensors, WeightBounds()) == []
