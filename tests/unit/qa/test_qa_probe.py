"""The shipped probe set: deterministic (pinned digest), every family in any prefix, bounded sizes."""

from __future__ import annotations

import pytest

from lorafleet.errors import ValidationError
from lorafleet.qa.probe import PROBE_MAX_SIZE, PROBE_SHA256, probe_digest, probe_examples


def test_the_probe_set_is_pinned_and_deterministic() -> None:
    assert probe_digest() == PROBE_SHA256
    assert probe_examples(32) == probe_examples(32) == probe_examples(PROBE_MAX_SIZE)[:32]


def test_any_prefix_covers_every_family_of_patterns() -> None:
    prompts = [e.prompt for e in probe_examples(5)]
    assert [p.split(" ", 1)[0] for p in prompts] == ["Count:", "Letters:", "Days:", "The", "Say"]
    for example in probe_examples(40):
        assert example.completion.endswith("\n") and example.kind == "probe" and example.prompt
    assert len({e.prompt for e in probe_examples(32)}) == 32  # the default size repeats no prompt


@pytest.mark.parametrize("size", [0, PROBE_MAX_SIZE + 1])
def test_sizes_outside_the_set_are_refused(size: int) -> None:
    with pytest.raises(ValidationError):
        probe_examples(size)
