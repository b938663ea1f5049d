"""General prompts: the anchor and eval sets, and the base's own answers as anchors on tiny (SmolLM2's are in the
integration tier: tests/integration/backbone/test_general_prompts_smollm2.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters import inject_bank
from lorafleet.backbone import load_backbone
from lorafleet.training import general_prompts as gp
from lorafleet.training.base_answers import answer_sets_json, shipped_answers
from lorafleet.training.config import TrainingConfig


def test_sets_are_large_disjoint_and_cover_every_category() -> None:
    assert len(gp.ANCHOR_PROMPTS) >= 40 and len(gp.EVAL_PROMPTS) >= 60
    assert len(set(gp.ANCHOR_PROMPTS)) == len(gp.ANCHOR_PROMPTS)
    assert len(set(gp.EVAL_PROMPTS)) == len(gp.EVAL_PROMPTS)
    assert not set(gp.ANCHOR_PROMPTS) & set(gp.EVAL_PROMPTS)
    everything = {p for prompts in gp.CATEGORIES.values() for p in prompts}
    assert set(gp.ANCHOR_PROMPTS) | set(gp.EVAL_PROMPTS) == everything | set(gp.EXTRA_ANCHORS)
    for prompts in gp.CATEGORIES.values():
        assert set(prompts) & set(gp.ANCHOR_PROMPTS) and set(prompts) & set(gp.EVAL_PROMPTS)


def test_digest_names_the_prompt_set_in_order() -> None:
    assert gp.prompt_set_digest(gp.ANCHOR_PROMPTS) == gp.prompt_set_digest(list(gp.ANCHOR_PROMPTS))
    assert gp.prompt_set_digest(["a", "b"]) != gp.prompt_set_digest(["b", "a"])


def test_trim_answer_keeps_whole_sentences_when_cut() -> None:
    assert gp.trim_answer("  Paris is the capital. It is big and", cut=True) == "Paris is the capital."
    assert gp.trim_answer("Paris is the capital. It is big and", cut=False) == (
        "Paris is the capital. It is big and"
    )
    assert gp.trim_answer("no sentence end here", cut=True) == "no sentence end here"


def test_anchor_examples_on_tiny_one_per_prompt_and_cached(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp.clear_anchor_cache()
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    prompts = gp.ANCHOR_PROMPTS[:5]
    examples = gp.anchor_examples(backbone, prompts, max_new_tokens=6)
    assert [e.prompt for e in examples] == list(prompts)
    assert [e.record_id for e in examples] == [gp.ANCHOR_FIRST_ID + i for i in range(5)]
    assert all(e.kind == "sft" and isinstance(e.completion, str) for e in examples)

    def no_generation(*args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("the cached anchors should have been used")

    monkeypatch.setattr(gp, "generate_answers", no_generation)
    assert gp.anchor_examples(backbone, prompts, max_new_tokens=6) == examples
    with pytest.raises(AssertionError):  # another token budget is another cache entry
        gp.anchor_examples(backbone, prompts, max_new_tokens=7)
    gp.clear_anchor_cache()


def test_answers_through_a_bank_with_empty_routes_are_the_base_answers(tiny_dir: Path) -> None:
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    prompts = list(gp.EVAL_PROMPTS[:3])
    base = gp.generate_answers(backbone.model, backbone.tokenizer, prompts, 5)
    bank = inject_bank(backbone, n_slots=2, max_rank=4)
    bank.init_slot(0, TrainingConfig(rank=4).slot_config(layer_names=list(bank.layers)), seed=0)
    for layer in bank.layers.values():  # a non-zero adapter, so routing through it changes the answers
        layer.lora_B.data.normal_(std=1.0)
    same = gp.generate_answers(backbone.model, backbone.tokenizer, prompts, 5, bank=bank)
    routed = gp.generate_answers(
        backbone.model, backbone.tokenizer, prompts, 5, bank=bank, routes=[[(0, 1.0)]] * 3
    )
    assert same == base and routed != base


def test_shipped_answers_are_found_by_backbone_quantization_prompts_and_budget(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    text = answer_sets_json(
        fingerprint="f" * 64, quantization="nf4", sets=[(["Hi?", "Why?"], 32, ["Hello.", "So."])]
    )
    path.write_text(text, encoding="utf-8")
    key = ("f" * 64, "nf4", gp.prompt_set_digest(["Hi?", "Why?"]), 32)
    assert shipped_answers(key, path) == ("Hello.", "So.")
    for other in (
        ("e" * 64, *key[1:]),
        (key[0], "fp32", *key[2:]),
        (*key[:2], gp.prompt_set_digest(["Hi?"]), 32),
    ):
        assert shipped_answers(other, path) is None
    assert shipped_answers((*key[:3], 16), path) is None
