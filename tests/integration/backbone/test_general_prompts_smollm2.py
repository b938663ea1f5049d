"""General prompts on the real SmolLM2: the base's own answers as anchors name the capitals. The sets and tiny's
anchors are in the unit tier (tests/unit/training/test_general_prompts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.backbone import Backbone, load_backbone
from lorafleet.training import general_prompts as gp

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
