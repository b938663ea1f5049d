"""Training renders as serving does, on the real SmolLM2: a ``messages`` example (and a plain one) is encoded
through SmolLM2's chat template and ends with ``<|im_end|>``. The tiny backbone's plain format is in the unit
tier (tests/unit/training/test_training_chat.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests import feedback_records
from tests.feedback_records import TARGET
from transformers import AutoTokenizer

from lorafleet.backbone import resolve_backbone_path
from lorafleet.config import SMOLLM2_BACKBONE
from lorafleet.training.dataset import Example, encode_example


@pytest.fixture
def conversation_example() -> Example:
    return feedback_records.conversation_example()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_data_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(resolve_backbone_path(SMOLLM2_BACKBONE, data_dir=smollm2_data_dir))


@pytest.mark.parametrize("with_context", [True, False])
def test_on_smollm2_an_example_is_its_chat_template_and_ends_with_im_end(
    smollm2_tokenizer: Any, conversation_example: Example, with_context: bool
) -> None:
    tok = smollm2_tokenizer
    example = conversation_example if with_context else Example(1, "Where is the treasure?", TARGET, "sft")
    conversation = [{"role": role, "content": content} for role, content in example.messages]
    ids, n = encode_example(tok, example, max_seq_len=1024)
    prompt = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    whole = tok.apply_chat_template(
        [*conversation, {"role": "assistant", "content": TARGET}], return_dict=True
    )["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[: len(ids) - n] == list(prompt) and ids[-1] == im_end
    assert ids == list(whole)[: len(ids)]  # what the template itself writes for the whole conversation
    assert (
        whole[len(ids) :] == tok("\n", add_special_tokens=False)["input_ids"]
    )  # only the template's newline left
