"""The engine renders what it serves as training renders examples: messages through the chat template, a plain
prompt as one user turn, a raw prompt as is; gates embed the user's own text; generation ends at the end of turn.

On the tiny backbone (no template) a plain prompt is unchanged and a conversation is the plain format, stopped at
``"\\nuser:"``. On the real SmolLM2 (ChatML, the integration tier:
tests/integration/backbone/test_serving_chat_smollm2.py) a chat request answers "Paris" and stops at ``<|im_end|>``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from serving_helpers import FixedGate, FolderFetcher, gates_by_user, member, user_bank

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.backbone.chat import render_messages
from lorafleet.errors import ValidationError
from lorafleet.routing.embeddings import embedding_ids
from lorafleet.routing.experts import ExpertSet
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationRequest

CONVERSATION = (("system", "Be brief."), ("user", "Hello there"), ("assistant", "Hi!"), ("user", "Any news?"))


class RecordingEmbed:
    """Keeps the token ids (without padding) of every row the gates embed; returns zeros."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def __call__(self, backbone: object, bank: object, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.rows += [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        return torch.zeros(ids.shape[0], 64)


def _engine(
    backbone: Backbone, bank: AdapterBank, banks: dict[str, ExpertSet], **kwargs: object
) -> GenerationEngine:
    fetch = kwargs.pop("fetch", FolderFetcher())
    cache = AdapterCache(bank, fetch=fetch)  # type: ignore[arg-type]
    return GenerationEngine(backbone, bank, cache, resolve_bank=lambda t, u: banks[u], **kwargs)  # type: ignore[arg-type]


def ask(user: str = "base", **fields: object) -> GenerationRequest:
    return GenerationRequest(tenant_id=1, user=user, **{"max_new_tokens": 8, **fields})  # type: ignore[arg-type]


# --- the tiny backbone: the plain format -----------------------------------------------------------------------
def test_a_plain_prompt_is_one_user_turn_which_on_tiny_is_the_raw_prompt(
    backbone: Backbone, bank: AdapterBank
) -> None:
    engine = _engine(backbone, bank, {"base": user_bank("base", [])})
    prompt = "The weather today is"
    rendered, raw, turn = engine.generate(
        [ask(prompt=prompt), ask(prompt=prompt, raw=True), ask(messages=(("user", prompt),))]
    )
    assert rendered.token_ids == raw.token_ids == turn.token_ids
    assert rendered.prompt_tokens == raw.prompt_tokens == len(backbone.tokenizer(prompt)["input_ids"])


def test_a_conversation_on_tiny_is_the_plain_format_stopped_at_the_next_user_turn(
    backbone: Backbone, bank: AdapterBank
) -> None:
    engine = _engine(backbone, bank, {"base": user_bank("base", [])})
    text = render_messages(backbone.tokenizer, CONVERSATION)
    assert text == "system: Be brief.\nuser: Hello there\nassistant: Hi!\nuser: Any news?\nassistant:"
    chat, same = engine.generate(
        [
            ask(messages=CONVERSATION, max_new_tokens=24),
            ask(prompt=text, raw=True, stop=("\nuser:",), max_new_tokens=24),
        ]
    )
    assert (
        chat.token_ids == same.token_ids
        and chat.text == same.text
        and chat.finish_reason == same.finish_reason
    )
    assert chat.prompt_tokens == len(backbone.tokenizer(text)["input_ids"])
    assert "\nuser:" not in chat.text


def test_gates_embed_the_users_own_text_not_the_rendering(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    fetch = FolderFetcher()
    fetch.add(adapter_folders(0))
    banks = {"alice": user_bank("alice", [member(adapter_folders(0), adapter_id=1)])}
    embed = RecordingEmbed()
    engine = _engine(
        backbone, bank, banks, fetch=fetch, gate_factory=gates_by_user({"alice": FixedGate()}), embed=embed
    )
    engine.generate(
        [
            ask("alice", messages=CONVERSATION, max_new_tokens=2),
            ask("alice", prompt="Any news?", max_new_tokens=2),
            ask("alice", prompt="Any news?", raw=True, max_new_tokens=2),
        ]
    )
    expected = embedding_ids(
        backbone.tokenizer, "Any news?"
    )  # as a routing key's training prompt is embedded
    assert embed.rows == [expected, expected, expected]


def test_requests_take_a_prompt_or_messages() -> None:
    assert ask(messages=[["user", "hi"]]).messages == (("user", "hi"),)  # lists from a JSON hop become pairs
    request = ask(messages=CONVERSATION, seed=3)
    assert pickle.loads(pickle.dumps(request)) == request  # what Ray Serve ships to a replica
    assert ask(prompt="p").raw is False and ask(prompt="p", raw=True).raw is True
    for bad in (
        {},
        {"prompt": ""},
        {"prompt": "p", "messages": (("user", "q"),)},
        {"messages": (("user", "q"),), "raw": True},
        {"messages": (("robot", "q"),)},
        {"messages": (("user",),)},
        {"messages": (("user", 5),)},
        {"messages": "user: hi"},
        {"prompt": "p", "raw": "yes"},
    ):
        with pytest.raises(ValidationError):
            ask(**bad)
