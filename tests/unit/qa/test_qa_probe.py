"""The shipped probe set: general prompts never trained on (EVAL_PROMPTS), pinned, every category in a prefix."""

from __future__ import annotations

import pytest

from lorafleet.errors import ValidationError
from lorafleet.qa.probe import PROBE_MAX_SIZE, PROBE_SHA256, probe_digest, probe_prompts
from lorafleet.training.general_prompts import ANCHOR_PROMPTS, CATEGORIES, EVAL_PROMPTS


def test_the_probe_set_is_pinned_and_deterministic() -> None:
    assert probe_digest() == PROBE_SHA256
    assert probe_prompts(32) == probe_prompts(32) == probe_prompts(PROBE_MAX_SIZE)[:32]


def test_the_probe_is_the_never_trained_general_prompts_and_a_prefix_covers_every_category() -> None:
    assert set(probe_prompts(PROBE_MAX_SIZE)) == set(EVAL_PROMPTS)
    assert not set(probe_prompts(PROBE_MAX_SIZE)) & set(ANCHOR_PROMPTS)
    first = probe_prompts(len(CATEGORIES))
    assert [next(c for c, ps in CATEGORIES.items() if p in ps) for p in first] == list(CATEGORIES)


@pytest.mark.parametrize("size", [0, PROBE_MAX_SIZE + 1])
def test_sizes_outside_the_set_are_refused(size: int) -> None:
    with pytest.raises(ValidationError):
        probe_prompts(size)
