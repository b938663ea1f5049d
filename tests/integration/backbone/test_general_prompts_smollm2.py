"""General prompts on the real SmolLM2: the base's own answers as anchors name the capitals, and the answers that ship
with lorafleet are this backbone's. The sets and tiny's anchors are in the unit tier
(tests/unit/training/test_general_prompts.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.backbone import Backbone, load_backbone
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.probe import PROBE_MAX_NEW_TOKENS, probe_examples, probe_prompts
from lorafleet.training import general_prompts as gp
from lorafleet.training.base_answers import SHIPPED_ANSWERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in the unit tier they came from


@pytest.fixture(scope="module")
def smollm2_nf4(smollm2_data_dir: Path) -> Backbone:
    return load_backbone("builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=smollm2_data_dir)


def test_smollm2_anchor_answers_name_the_capital(smollm2_nf4: Backbone) -> None:
    gp.clear_anchor_cache()
    prompts = list(gp.CAPITALS)
    examples = gp.anchor_examples(smollm2_nf4, prompts, max_new_tokens=10)
    for example in examples:
        assert gp.CAPITALS[example.prompt] in example.completion, (example.prompt, example.completion)
    gp.clear_anchor_cache()


# --- the shipped answers (lorafleet.training.base_answers) ----------------------------------------------------------
def _shipped_sets() -> list[dict[str, Any]]:
    return json.loads(SHIPPED_ANSWERS.read_text(encoding="utf-8"))["sets"]


def test_the_shipped_answers_belong_to_the_backbone_the_conversion_makes(smollm2_nf4: Backbone) -> None:
    """Else every fresh process generates them again (infra/ship_base_answers.py rewrites the file)."""
    data = json.loads(SHIPPED_ANSWERS.read_text(encoding="utf-8"))
    assert (data["fingerprint"], data["quantization"]) == (smollm2_nf4.fingerprint.digest, "nf4")
    shipped = {(tuple(s["prompts"]), s["max_new_tokens"]) for s in _shipped_sets()}
    assert shipped == {
        (gp.ANCHOR_PROMPTS, gp.ANCHOR_MAX_NEW_TOKENS),
        (tuple(probe_prompts(QAPolicy().probe_size)), PROBE_MAX_NEW_TOKENS),
    }


def test_the_shipped_answers_are_the_models_greedy_answers(smollm2_nf4: Backbone) -> None:
    """A sample of each set, generated again here as ``anchor_examples`` generates them, equals what ships."""
    for shipped in _shipped_sets():
        sample = range(0, len(shipped["prompts"]), 17)
        prompts = [shipped["prompts"][i] for i in sample]
        answers = gp.generate_answers(
            smollm2_nf4.model, smollm2_nf4.tokenizer, prompts, shipped["max_new_tokens"]
        )
        assert answers == [shipped["answers"][i] for i in sample]


def test_anchors_and_probe_come_from_the_shipped_answers_without_generating(
    smollm2_nf4: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_generation(*args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("generated answers that ship with lorafleet")

    gp.clear_anchor_cache()
    monkeypatch.setattr(gp, "generate_answers", no_generation)
    try:
        anchors, probe = gp.anchor_examples(smollm2_nf4), probe_examples(smollm2_nf4)
        assert [(e.prompt, e.completion) for e in anchors + probe] == [
            (p, a) for s in _shipped_sets() for p, a in zip(s["prompts"], s["answers"], strict=True)
        ]
        with pytest.raises(AssertionError, match="generated"):  # another budget is not shipped
            gp.anchor_examples(smollm2_nf4, max_new_tokens=gp.ANCHOR_MAX_NEW_TOKENS + 1)
    finally:
        gp.clear_anchor_cache()
