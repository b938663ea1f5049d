"""TrainingConfig: defaults, bounds (as lorafleet ValidationError), typical-range notes, slot configs."""

from __future__ import annotations

import pytest

from lorafleet.adapters.bank import on_layers
from lorafleet.errors import ValidationError
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS, TrainingConfig


def test_defaults_are_the_measured_ones() -> None:
    """Chosen on SmolLM2-135M nf4 (README, "Training defaults"): top layers, a higher rate, few steps, anchors."""
    config = TrainingConfig()
    assert (config.rank, config.alpha, config.dropout) == (8, 16.0, 0.05)
    assert (config.learning_rate, config.warmup_ratio, config.max_steps) == (2e-3, 0.1, 20)
    assert (config.batch_size, config.grad_accum_steps, config.max_grad_norm) == (6, 1, 1.0)
    assert (config.replay_ratio, config.l2_to_parent, config.holdout_fraction) == (1.0, 0.0, 0.2)
    assert (config.target_modules, config.layers, config.anchor_ratio) == ("all-linear", "top 10", 0.3)
    assert (config.min_epochs, config.continual_min_epochs, config.lr_ratio_b) == (0.0, None, 1.0)
    # the services': at least 2.7 passes (4 when continuing), the B matrices at 4x the learning rate (LoRA+), and
    # half a weight of KL to the base on the anchors
    assert SERVICE_TRAINING_DEFAULTS == {
        "min_epochs": 2.7,
        "continual_min_epochs": 4.0,
        "lr_ratio_b": 4.0,
        "anchor_distill": 0.5,
    }
    assert config.outside_typical_ranges() == []


@pytest.mark.parametrize(
    ("layers", "expected"),
    [("all", None), ("top 2", [28, 29]), ("top 40", list(range(30))), ([3, 1], [1, 3])],
)
def test_layers_resolve_like_layers_to_transform(layers: object, expected: list[int] | None) -> None:
    assert TrainingConfig(layers=layers).layer_indices(30) == expected


@pytest.mark.parametrize("layers", ["top 0", "top", "bottom 3", "2", [], [1, 1], [-1], [True]])
def test_bad_layers_name_the_field(layers: object) -> None:
    with pytest.raises(ValidationError, match="layers"):
        TrainingConfig(layers=layers)


def test_a_slot_on_the_top_layers_gets_weights_there_only() -> None:
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")] + ["lm_head"]
    slot = TrainingConfig(layers="top 1").slot_config()
    assert slot.layers == "top 1"
    assert on_layers(names, slot.layers) == [
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    assert on_layers(names, (0, 2)) == [n for n in names if ".0." in n or ".2." in n]
    assert on_layers(names, "top 9") == names[:-1]
    assert TrainingConfig(layers="all").slot_config().layers is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("rank", 65),
        ("rank", 8.0),
        ("rank", True),
        ("alpha", 0.0),
        ("alpha", float("nan")),
        ("dropout", 0.6),
        ("learning_rate", 1e-6),
        ("learning_rate", 0.1),
        ("warmup_ratio", 0.9),
        ("max_steps", 0),
        ("batch_size", 0),
        ("grad_accum_steps", 0),
        ("max_grad_norm", 0.0),
        ("max_seq_len", 4),
        ("replay_ratio", -0.1),
        ("l2_to_parent", -1.0),
        ("holdout_fraction", 1.0),
        ("rating_threshold", 1.5),
        ("sft_weight", -0.5),
        ("dpo_weight", float("inf")),
        ("dpo_weight", 101.0),
        ("dpo_beta", 0.0),
        ("pairs_per_step", 0),
        ("pairs_per_step", 2.0),
        ("seed", -1),
        ("target_modules", ""),
        ("target_modules", []),
        ("lr_ratio_b", 0.5),
        ("lr_ratio_b", float("nan")),
        ("contrast_ratio", -0.1),
        ("contrast_ratio", 1.5),
    ],
)
def test_out_of_bounds_values_raise_lorafleet_validation_error_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(ValidationError, match=rf"invalid training config: {field}"):
        TrainingConfig(**{field: value})


def test_a_config_that_trains_nothing_is_refused_naming_the_weights() -> None:
    with pytest.raises(ValidationError, match="dpo_weight: 0 with sft_weight 0"):
        TrainingConfig(sft_weight=0.0)
    assert TrainingConfig(sft_weight=0.0, dpo_weight=1.0).trains_preferences
    assert not TrainingConfig().trains_preferences  # preferences train SFT on chosen unless DPO is asked for


def test_unknown_fields_and_non_mappings_are_refused() -> None:
    with pytest.raises(ValidationError, match="lr: Extra inputs are not permitted"):
        TrainingConfig.from_mapping({"lr": 1e-3})
    with pytest.raises(ValidationError, match="must be an object"):
        TrainingConfig.from_mapping([("rank", 4)])  # type: ignore[arg-type]
    assert TrainingConfig.from_mapping(None) == TrainingConfig()
    assert TrainingConfig.from_mapping({"rank": 4}).rank == 4


def test_config_is_frozen_and_with_changes_validates() -> None:
    config = TrainingConfig()
    with pytest.raises(Exception, match="frozen"):
        config.rank = 4  # type: ignore[misc]
    assert config.with_changes(rank=16).rank == 16
    with pytest.raises(ValidationError, match="rank"):
        config.with_changes(rank=100)


def test_values_outside_the_typical_range_are_allowed_and_named() -> None:
    config = TrainingConfig(rank=32, learning_rate=3e-3, dropout=0.0)
    notes = config.outside_typical_ranges()
    assert len(notes) == 3
    assert any(n.startswith("rank=32") for n in notes)
    assert any(n.startswith("learning_rate=0.003") for n in notes)


def test_slot_config_resolves_target_modules() -> None:
    layers = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.up_proj",
    ]
    assert TrainingConfig().slot_config().target_modules is None
    listed = TrainingConfig(target_modules=["q_proj", "v_proj"], rank=4, alpha=8).slot_config(name="v1")
    assert (listed.target_modules, listed.rank, listed.alpha, listed.name) == (
        ("q_proj", "v_proj"),
        4,
        8.0,
        "v1",
    )
    regex = TrainingConfig(target_modules=r".*self_attn\.(q|v)_proj").slot_config(layer_names=layers)
    assert regex.target_modules == tuple(layers[:2])
    with pytest.raises(ValidationError, match="layer names"):
        TrainingConfig(target_modules=r".*q_proj").slot_config()
    with pytest.raises(ValidationError, match="match no layer"):
        TrainingConfig(target_modules=r".*o_proj").slot_config(layer_names=layers)


def test_min_epochs_adds_steps_for_a_job_with_more_rows() -> None:
    config = TrainingConfig(**SERVICE_TRAINING_DEFAULTS)  # 20 steps of 6 rows; 2.7 passes, 4 when continuing
    assert config.steps_for(44) == 20  # a first round: 2.7 passes fit in max_steps
    assert config.steps_for(44, continuing=True) == 30  # a continual round with as many rows: 4 passes
    assert config.steps_for(72, continuing=True) == 48  # with replay: twice the rows
    assert config.steps_for(72) == 33  # a fresh adapter on as many rows: 2.7 passes
    assert TrainingConfig(max_steps=30).steps_for(1000, continuing=True) == 30  # off in the library's default
    assert config.with_changes(grad_accum_steps=2).steps_for(72, continuing=True) == 24
    assert config.with_changes(continual_min_epochs=None).steps_for(72, continuing=True) == 33  # min_epochs'


@pytest.mark.parametrize("value", [-1.0, 101.0, float("nan")])
def test_continual_min_epochs_is_bounded(value: float) -> None:
    with pytest.raises(ValidationError, match="continual_min_epochs"):
        TrainingConfig(continual_min_epochs=value)
