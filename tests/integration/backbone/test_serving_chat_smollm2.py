"""The engine on the real SmolLM2 (ChatML): a chat request answers "Paris" and stops at ``<|im_end|>``, and a
plain prompt is served as the same one-turn chat. The tiny backbone's plain format is in the unit tier
(tests/unit/serving/test_serving_chat.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.serving.serving_helpers import FolderFetcher, user_bank

from lorafleet.adapters import inject_bank
from lorafleet.backbone import load_backbone
from lorafleet.config import SMOLLM2_BACKBONE
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in the unit tier they came from

FRANCE = "What is the capital of France? Answer in one word."


def ask(**fields: object) -> GenerationRequest:
    return GenerationRequest(tenant_id=1, user="base", **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_data_dir: Path) -> GenerationEngine:
    backbone = load_backbone(SMOLLM2_BACKBONE, quantization="nf4", device="cpu", data_dir=smollm2_data_dir)
    bank = inject_bank(backbone, target_modules=["q_proj", "v_proj"], n_slots=1, max_rank=4)
    base = user_bank("base", [])
    cache = AdapterCache(bank, fetch=FolderFetcher())  # type: ignore[arg-type]
    return GenerationEngine(backbone, bank, cache, resolve_bank=lambda t, u: base)


def test_a_chat_request_on_smollm2_answers_paris_and_stops_at_the_end_of_turn(
    smollm2_engine: GenerationEngine,
) -> None:
    tok = smollm2_engine.backbone.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    chat, prompt = smollm2_engine.generate(
        [ask(messages=(("user", FRANCE),), max_new_tokens=20), ask(prompt=FRANCE, max_new_tokens=20)]
    )
    assert "Paris" in chat.text, chat.text
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == im_end
    assert "<|im_end|>" not in chat.text and im_end not in chat.token_ids[:-1]
    conversation = [{"role": "user", "content": FRANCE}]
    template_ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert chat.prompt_tokens == len(template_ids)
    assert prompt.token_ids == chat.token_ids and prompt.text == chat.text  # /generate answers as chat does
