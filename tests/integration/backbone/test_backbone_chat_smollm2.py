"""Chat rendering (``lorafleet.backbone.chat``) on the real SmolLM2: its ChatML through its own template with the
same ids as ``apply_chat_template(tokenize=True)`` (no second BOS), and ``<|im_end|>`` as the end of turn.

The plain format on the tiny backbone is in the unit tier (tests/unit/backbone/test_backbone_chat.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, GenerationConfig

from lorafleet.backbone import resolve_backbone_path
from lorafleet.backbone.chat import (
    chat_stop_strings,
    encode_messages,
    end_of_turn_id,
    end_of_turn_ids,
    has_chat_template,
    render_messages,
    template_end_of_turn_id,
)
from lorafleet.config import SMOLLM2_BACKBONE

CONVERSATIONS: list[list[tuple[str, str]]] = [
    [("user", "What is the capital of France? Answer in one word.")],
    [("system", "Be brief."), ("user", "Hello")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [
        ("system", "You answer in French."),
        ("user", "Good morning"),
        ("assistant", "Bonjour"),
        ("user", "Thanks"),
    ],
]


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_data_dir: Path) -> Path:
    return resolve_backbone_path(SMOLLM2_BACKBONE, data_dir=smollm2_data_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _dicts(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


# --- SmolLM2's ChatML -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_rendering_equals_apply_chat_template(
    smollm2_tokenizer: Any, messages: list[tuple[str, str]]
) -> None:
    tok = smollm2_tokenizer
    assert has_chat_template(tok)
    expected_text = tok.apply_chat_template(_dicts(messages), tokenize=False, add_generation_prompt=True)
    assert render_messages(tok, messages) == expected_text
    assert expected_text.endswith("<|im_start|>assistant\n")
    expected_ids = tok.apply_chat_template(
        _dicts(messages), tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    ids = encode_messages(tok, messages)
    assert ids == list(expected_ids)  # the template's special tokens once: no extra BOS
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == expected_text.count("<|im_start|>")
    assert chat_stop_strings(tok, messages) == ()


def test_chatml_ends_a_turn_with_im_end_which_is_the_eos(smollm2_tokenizer: Any, smollm2_dir: Path) -> None:
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tok.eos_token_id == 2
    assert template_end_of_turn_id(tok) == end_of_turn_id(tok) == im_end
    assert im_end in end_of_turn_ids(GenerationConfig.from_pretrained(smollm2_dir), tok)


def test_a_template_end_of_turn_other_than_the_eos_is_found(smollm2_tokenizer: Any) -> None:
    """A ChatML tokenizer whose eos is another token (as in Qwen's): ``<|im_end|>`` still ends a turn."""

    class OtherEos:
        chat_template = smollm2_tokenizer.chat_template
        eos_token_id = smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        all_special_ids = smollm2_tokenizer.all_special_ids

        def __call__(self, text: str, **kwargs: Any) -> Any:
            return smollm2_tokenizer(text, **kwargs)

        def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
            return smollm2_tokenizer.apply_chat_template(*args, **kwargs)

        def convert_ids_to_tokens(self, token_id: int) -> Any:
            return smollm2_tokenizer.convert_ids_to_tokens(token_id)

    tok = OtherEos()
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    assert end_of_turn_ids(GenerationConfig(eos_token_id=[tok.eos_token_id]), tok) == {
        tok.eos_token_id,
        im_end,
    }
