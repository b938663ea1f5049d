"""Chat rendering (``lorafleet.backbone.chat``): the plain format on the tiny backbone (a single user turn is its
text unchanged, anything else today's role lines), SmolLM2's ChatML through its own template with the same ids as
``apply_chat_template(tokenize=True)`` (no second BOS), and the end-of-turn ids (``<|im_end|>``, else the eos)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, GenerationConfig

from lorafleet.backbone import resolve_backbone_path
from lorafleet.backbone.chat import (
    PLAIN_STOP,
    chat_stop_strings,
    encode_messages,
    end_of_turn_id,
    end_of_turn_ids,
    has_chat_template,
    last_user_content,
    render_messages,
    template_end_of_turn_id,
)
from lorafleet.config import SMOLLM2_BACKBONE
from lorafleet.errors import ValidationError

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
def tiny_tokenizer(tiny_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_data_dir: Path) -> Path:
    return resolve_backbone_path(SMOLLM2_BACKBONE, data_dir=smollm2_data_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _dicts(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


# --- the plain format (a backbone without a chat template) ------------------------------------------------------
def test_a_single_user_turn_is_its_text_unchanged_on_tiny(tiny_tokenizer: Any) -> None:
    assert not has_chat_template(tiny_tokenizer)
    prompt = "The weather today is"
    assert render_messages(tiny_tokenizer, [("user", prompt)]) == prompt
    assert render_messages(tiny_tokenizer, [{"role": "user", "content": prompt}]) == prompt
    assert encode_messages(tiny_tokenizer, [("user", prompt)]) == list(tiny_tokenizer(prompt)["input_ids"])
    assert chat_stop_strings(tiny_tokenizer, [("user", prompt)]) == ()


def test_other_conversations_are_role_lines_then_assistant_on_tiny(tiny_tokenizer: Any) -> None:
    messages = [("system", "Be brief."), ("user", "Hello"), ("assistant", "Hi!"), ("user", "Bye")]
    text = "system: Be brief.\nuser: Hello\nassistant: Hi!\nuser: Bye\nassistant:"
    assert render_messages(tiny_tokenizer, messages) == text
    assert render_messages(tiny_tokenizer, messages, add_generation_prompt=False) == text.removesuffix(
        "assistant:"
    )
    assert encode_messages(tiny_tokenizer, messages) == list(tiny_tokenizer(text)["input_ids"])
    assert chat_stop_strings(tiny_tokenizer, messages) == (PLAIN_STOP,) == ("\nuser:",)


def test_the_end_of_turn_without_a_template_is_the_eos(tiny_tokenizer: Any, tiny_dir: Path) -> None:
    assert template_end_of_turn_id(tiny_tokenizer) is None
    assert end_of_turn_id(tiny_tokenizer) == tiny_tokenizer.eos_token_id
    config = GenerationConfig.from_pretrained(tiny_dir)
    assert end_of_turn_ids(config, tiny_tokenizer) == {tiny_tokenizer.eos_token_id}


def test_the_last_user_turn_is_what_gates_embed() -> None:
    assert last_user_content(CONVERSATIONS[2]) == "Tell me a joke."
    assert last_user_content([("user", "q"), ("assistant", "a")]) == "q"
    assert last_user_content([("system", "only a system prompt")]) == "only a system prompt"
    with pytest.raises(ValidationError):
        render_messages(None, [])


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


def test_a_conversation_the_template_refuses_is_a_validation_error() -> None:
    class Strict:
        chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"

        def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
            raise ValueError("Conversation roles must alternate user/assistant")

    with pytest.raises(ValidationError, match="^messages: .*alternate"):
        render_messages(Strict(), [("user", "a"), ("user", "b")])


def test_importing_chat_does_not_import_torch() -> None:
    probe = (
        "import sys, lorafleet.backbone.chat; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"]
