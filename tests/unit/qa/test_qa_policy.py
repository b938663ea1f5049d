"""``QAPolicy``: defaults, validation through lorafleet's own error, and JSON round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError as PydanticValidationError

from lorafleet.backbone import build_tiny_backbone
from lorafleet.errors import ValidationError
from lorafleet.qa.policy import DEFAULT_POLICY_VERSION, QAPolicy
from lorafleet.qa.probe import PRETRAINED_EPSILON_PROBE, RANDOM_INIT_EPSILON_PROBE, probe_epsilon_for


def test_defaults_are_valid_and_versioned() -> None:
    policy = QAPolicy()
    assert policy.version == DEFAULT_POLICY_VERSION
    assert (policy.delta, policy.epsilon, policy.epsilon_probe) == (0.0, 0.05, None)
    assert (policy.answer_evidence, policy.answer_confidence) == ("require", 0.95)
    assert QAPolicy.from_mapping(policy.model_dump()) == policy
    assert QAPolicy.from_mapping(None) == policy


def test_the_probe_bound_is_the_backbones_unless_the_policy_sets_one(tmp_path: Path) -> None:
    tiny = build_tiny_backbone(tmp_path)
    assert probe_epsilon_for(tiny) == RANDOM_INIT_EPSILON_PROBE == 0.75
    assert probe_epsilon_for(tmp_path / "a-pretrained-hf-folder") == PRETRAINED_EPSILON_PROBE == 0.25
    assert QAPolicy().for_probe_bound(0.25).epsilon_probe == 0.25
    assert QAPolicy(epsilon_probe=0.5).for_probe_bound(0.25).epsilon_probe == 0.5  # an explicit bound stays


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epsilon": -0.1}, "epsilon"),
        ({"delta": float("nan")}, "delta"),
        ({"max_bank_members": 0}, "max_bank_members"),
        ({"probe_size": 1000}, "probe_size"),
        ({"version": ""}, "version"),
        ({"unknown": 1}, "unknown"),
        ({"max_bank_members": "3"}, "max_bank_members"),
    ],
)
def test_bad_values_raise_validation_error_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        QAPolicy.from_mapping(changes)


def test_norm_bounds_must_be_ordered_and_copies_are_validated() -> None:
    with pytest.raises(ValidationError, match="min_update_norm"):
        QAPolicy(min_update_norm=5.0, max_update_norm=1.0)
    tightened = QAPolicy().with_changes(version="strict", epsilon=0.01)
    assert (tightened.version, tightened.epsilon) == ("strict", 0.01)
    with pytest.raises(ValidationError):
        QAPolicy().with_changes(epsilon=-1)
    with pytest.raises(ValidationError, match="object"):
        QAPolicy.from_mapping([1, 2])  # type: ignore[arg-type]
    with pytest.raises(PydanticValidationError, match="frozen"):
        QAPolicy().epsilon = 1.0  # type: ignore[misc]
