"""The engine on the real SmolLM2 (ChatML): a chat request answers "Paris" and stops at ``<|im_end|>``, and a
plain prompt is served as the same one-turn chat. The tiny backbone's plain format is in the unit tier
(tests/unit/serving/test_serving_chat.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.lora_weights import random_lora_weights
from tests.unit.serving.serving_helpers import FolderFetcher, user_bank

import lorafleet.serving.decode as decode
from lorafleet.adapters import SlotConfig, inject_bank
from lorafleet.backbone import load_backbone
from lorafleet.config import SMOLLM2_BACKBONE
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationRequest
from lorafleet.serving.decode import BatchDecoder, DecodeBatch, RowOutput, RowSpec

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


def test_a_fused_join_on_smollm2_in_nf4_decodes_what_separate_forwards_decode(
    smollm2_engine: GenerationEngine,
) -> None:
    """Newcomers' prefill inside the running rows' step (``serving/fused.py``) on the real 4-bit model, rows
    through an adapter and through the base: the same greedy tokens as a join with a forward of its own."""
    backbone, bank = smollm2_engine.backbone, smollm2_engine.bank
    tok = backbone.tokenizer
    bank.load_slot(0, random_lora_weights(bank, rank=4, seed=3, scale=0.05), SlotConfig(rank=4, alpha=8.0))
    try:

        def spec(text: str, routes: tuple[tuple[int, float], ...], tokens: int) -> RowSpec:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            return RowSpec(tuple(ids), routes, max_new_tokens=tokens)

        first = [spec(FRANCE, (), 8), spec("Name a colour.", ((0, 1.0),), 8)]
        later = [spec("What is 2 plus 2?", ((0, 1.0),), 6), spec(FRANCE, (), 8)]

        def run(fused: bool) -> dict[int, RowOutput]:
            batch = DecodeBatch(backbone.model, bank, tok, device=backbone.device)
            assert batch.fuses_joins
            outputs: dict[int, RowOutput] = {}
            updates = batch.join(list(enumerate(first))) + batch.step()
            joiners = [(2 + i, s) for i, s in enumerate(later)]
            updates += batch.join_and_step(joiners) if fused else batch.join(joiners) + batch.step()
            while True:
                outputs.update({int(u.key): u.output for u in updates if u.output is not None})  # type: ignore[call-overload]
                if not len(batch):
                    return outputs
                updates = batch.step()

        fused, separate = run(True), run(False)
        assert [fused[k].token_ids for k in range(4)] == [separate[k].token_ids for k in range(4)]
        assert (
            "Paris" in fused[0].text and "Paris" in fused[3].text
        )  # the base rows, before and after the join
    finally:
        bank.evict_slot(0)


def test_the_system_prompt_of_a_join_runs_once_per_route_on_smollm2(
    smollm2_engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ChatML puts the same system prompt before every question (24 tokens): a join runs it once per route and
    its rows decode what whole-prompt prefills decode, on the real 4-bit model."""
    backbone, bank = smollm2_engine.backbone, smollm2_engine.bank
    tok = backbone.tokenizer
    bank.load_slot(0, random_lora_weights(bank, rank=4, seed=5, scale=0.05), SlotConfig(rank=4, alpha=8.0))
    try:

        def spec(text: str, routes: tuple[tuple[int, float], ...]) -> RowSpec:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            return RowSpec(tuple(ids), routes, max_new_tokens=10, keep_logits=True)

        questions = [FRANCE, "Name a colour.", "What is 2 plus 2?"]
        specs = [spec(q, r) for q in questions for r in ((), ((0, 1.0),))]
        starts: list[int] = []
        real = decode.common_start

        def spy(prompts: object) -> int:
            starts.append(real(prompts))  # type: ignore[arg-type]
            return starts[-1]

        def run() -> list[RowOutput]:
            return BatchDecoder(backbone.model, bank, tok, device=backbone.device).run(specs)

        monkeypatch.setattr(decode, "common_start", spy)
        shared = run()
        assert starts and starts[0] >= 24
        monkeypatch.setattr(decode, "MIN_SHARED_START", 10**9)
        whole = run()
        for a, b in zip(shared, whole, strict=True):
            assert a.token_ids == b.token_ids
            gap = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))
            assert gap <= 1e-3, gap
        assert "Paris" in shared[0].text, shared[0].text
    finally:
        bank.evict_slot(0)
