"""Chat rendering (``lorafleet.backbone.chat``): the plain format on the tiny backbone (a single user turn is its
text unchanged, anything else today's role lines) and the end-of-turn ids (the eos without a template).

SmolLM2's ChatML (its own template, ``<|im_end|>``) loads the real backbone: the integration tier has it
(tests/integration/backbone/test_backbone_chat_smollm2.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, GenerationConfig

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
from lorafleet.errors import ValidationError


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_dir)


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
    joke = [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")]
    assert last_user_content(joke) == "Tell me a joke."
    assert last_user_content([("user", "q"), ("assistant", "a")]) == "q"
    assert last_user_content([("system", "only a system prompt")]) == "only a system prompt"
    with pytest.raises(ValidationError):
        render_messages(None, [])


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
