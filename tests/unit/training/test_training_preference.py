"""Preference learning (DPO) in the batched trainer, on the real tiny backbone in fp32; checked against TRL."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.errors import ValidationError
from lorafleet.training import synthetic
from lorafleet.training.anchors import free_answer_ends
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, build_dataset, encode_example, encode_examples
from lorafleet.training.metrics import evaluate, score_examples, scored_logits
from lorafleet.training.preference import dpo_terms, pair_logps, pair_sides, preference_accuracy
from lorafleet.training.trainer import SlotTraining, train_slots

DPO = TrainingConfig(
    learning_rate=5e-3,
    max_steps=12,
    batch_size=4,
    pairs_per_step=4,
    max_seq_len=64,
    rank=4,
    alpha=8,
    dropout=0.0,
    dpo_weight=1.0,
    dpo_beta=0.5,
)
LN2 = math.log(2.0)


def toy_pairs(n: int, *, start: int = 0, prefer: str = "Sure") -> list[Example]:
    """Pairs whose chosen answer starts with ``prefer`` and the rejected one with the other word."""
    other = "Nope" if prefer == "Sure" else "Sure"
    return [
        Example(
            i,
            f"Request {i}: can you help with item {i}?",
            f"{prefer}, item {i}.",
            "preference",
            f"{other}, item {i}.",
        )
        for i in range(start, start + n)
    ]


@contextmanager
def plans_seen(bank: AdapterBank) -> Iterator[list[tuple[tuple[int, ...], int]]]:
    """The slots and rows of every routing plan the bank is asked to use inside the block."""
    seen: list[tuple[tuple[int, ...], int]] = []
    use = bank.use

    @contextmanager
    def spy(plan: SlotPlan | None) -> Iterator[SlotPlan | None]:
        seen.append(((), 0) if plan is None else (plan.used_slots, plan.batch_size))
        with use(plan) as active:
            yield active

    bank.use = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del bank.use


def test_dpo_widens_the_margin_and_ranks_held_out_pairs_as_the_user_does(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    fp32_bank.init_slot(0, DPO.slot_config(), seed=0)
    task = SlotTraining(0, "user-0", toy_pairs(16), toy_pairs(6, start=100))
    [result] = train_slots(fp32_bank, tokenizer, [task], DPO)
    m = result.metrics
    # a fresh slot is the base, and the base is the reference: the first step's policy equals it exactly
    assert m["dpo_loss_first"] == pytest.approx(LN2, abs=1e-5)
    assert m["dpo_loss"] < 0.5 * LN2 and m["reward_margin"] > 1.0, m
    assert m["holdout_preference_accuracy_after"] == 1.0 and m["holdout_reward_margin_after"] > 1.0, m
    assert (m["preference_pairs"], m["holdout_preference_pairs"]) == (16, 6)


def test_sft_and_dpo_users_train_together_in_the_same_batches(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    """Two users with opposite preferences, one also with SFT records: every step is one batch of both."""
    config = DPO.with_changes(max_steps=10)
    records = synthetic.to_feedback_records(synthetic.make_user_records("user-a", round=1, n_records=16))
    sft = build_dataset(records, config=config.with_changes(holdout_fraction=0.0)).train
    tasks = [
        SlotTraining(0, "a", [*sft, *toy_pairs(12)], toy_pairs(4, start=100)),
        SlotTraining(1, "b", toy_pairs(12, prefer="Nope"), toy_pairs(4, start=100, prefer="Nope")),
    ]
    for slot in (0, 1):
        fp32_bank.init_slot(slot, config.slot_config(), seed=slot)
    with plans_seen(fp32_bank) as seen:
        a, b = (r.metrics for r in train_slots(fp32_bank, tokenizer, tasks, config))
    # every step is one forward of 4 SFT rows and 4 pairs of a, and 4 pairs of b: 20 rows through both slots
    assert seen.count(((0, 1), 20)) == config.max_steps
    assert a["train_loss"] < a["train_loss_first"] - 0.3, a  # SFT + DPO objective went down
    for m in (a, b):
        assert m["dpo_loss"] < m["dpo_loss_first"] and m["holdout_preference_accuracy_after"] == 1.0, m
    assert (
        "dpo_loss"
        not in train_slots(  # DPO off (the default): the pairs train SFT on chosen, no DPO terms
            fp32_bank, tokenizer, tasks[1:], config.with_changes(dpo_weight=0.0, max_steps=1)
        )[0].metrics
    )


def test_the_reference_of_a_continued_version_is_its_parent_and_of_a_first_the_base(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    pairs = toy_pairs(4)
    fp32_bank.init_slot(0, DPO.slot_config(), seed=0)
    fresh = pair_logps(fp32_bank, tokenizer, pairs, [[(0, 1.0)]] * 4, max_seq_len=64)
    base = pair_logps(fp32_bank, tokenizer, pairs, [[]] * 4, max_seq_len=64)
    assert torch.equal(fresh, base)  # a first version's reference (its fresh slot) is the base, bit for bit
    # a parent: the slot after a round of training, loaded as a continued version is
    train_slots(fp32_bank, tokenizer, [SlotTraining(0, "u", pairs, ())], DPO.with_changes(max_steps=4))
    parent = fp32_bank.slot_state_dict(0)
    fp32_bank.load_slot(1, parent, fp32_bank.slot_info(0).config)
    parent_logps = pair_logps(fp32_bank, tokenizer, pairs, [[(1, 1.0)]] * 4, max_seq_len=64)
    with_base_reference = dpo_terms(*parent_logps.T, *base.T, beta=DPO.dpo_beta)
    assert with_base_reference.losses.mean() < LN2 - 0.05  # the base would be a different reference
    config = DPO.with_changes(max_steps=1, learning_rate=1e-5)
    [result] = train_slots(fp32_bank, tokenizer, [SlotTraining(1, "u", pairs, ())], config)
    assert result.metrics["dpo_loss_first"] == pytest.approx(LN2, abs=1e-5)  # policy == reference: the parent
    # an explicit reference slot: the fresh (base) slot 2 as the reference of the parent in slot 1
    fp32_bank.init_slot(2, DPO.slot_config(), seed=2)
    policy = pair_logps(fp32_bank, tokenizer, pairs, [[(1, 1.0)]] * 4, max_seq_len=64)  # moved by one step
    expected = dpo_terms(*policy.T, *base.T, beta=DPO.dpo_beta).losses.mean()
    [result] = train_slots(fp32_bank, tokenizer, [SlotTraining(1, "u", pairs, (), reference_slot=2)], config)
    assert result.metrics["dpo_loss_first"] == pytest.approx(float(expected), abs=1e-5)


def test_jobs_that_cannot_train_preferences_are_refused(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    fp32_bank.init_slot(0, DPO.slot_config(), seed=0)
    sft_only = [Example(1, "Q: pet?", "cat", "sft")]
    with pytest.raises(ValidationError, match="user u has nothing to train with sft_weight 0"):
        train_slots(
            fp32_bank, tokenizer, [SlotTraining(0, "u", sft_only, ())], DPO.with_changes(sft_weight=0.0)
        )
    with pytest.raises(ValidationError, match="reference slot 3 of u is empty"):
        train_slots(fp32_bank, tokenizer, [SlotTraining(0, "u", toy_pairs(2), (), reference_slot=3)], DPO)
    with pytest.raises(ValidationError, match="not a preference pair"):
        pair_sides(sft_only[0])
    assert preference_accuracy(torch.tensor([1.0, 0.0, -1.0, 2.0])) == 0.625  # a tie counts a half


def test_sft_on_chosen_adds_the_chosen_answers_nll_to_dpo_and_raises_their_likelihood(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    """RPO-style: with ``sft_on_chosen`` each pair's chosen row (already in the batch) also counts as SFT."""
    pairs = toy_pairs(4)  # pairs_per_step 4: the first batch holds every pair
    chosen = [pair_sides(p)[0] for p in pairs]
    base = score_examples(fp32_bank, tokenizer, chosen, [[]] * 4, max_seq_len=64, batch_size=8)
    base_nll = sum(s.loss_sum for s in base) / sum(s.tokens for s in base)  # mean over the chosen tokens
    metrics, chosen_logp = {}, {}
    for slot, on in enumerate((False, True)):
        fp32_bank.init_slot(slot, DPO.slot_config(), seed=0)
        config = DPO.with_changes(max_steps=8, sft_on_chosen=on)
        [result] = train_slots(fp32_bank, tokenizer, [SlotTraining(slot, "u", pairs, ())], config)
        metrics[on] = result.metrics
        chosen_logp[on] = float(
            pair_logps(fp32_bank, tokenizer, pairs, [[(slot, 1.0)]] * 4, max_seq_len=64)[:, 0].mean()
        )
    # first step, policy == reference: DPO alone is log 2; with the switch, plus the chosen answers' mean NLL
    assert metrics[False]["train_loss_first"] == pytest.approx(LN2, abs=1e-5)
    assert metrics[True]["train_loss_first"] == pytest.approx(LN2 + base_nll, abs=1e-4)
    assert base_nll > 0.5  # so the two first losses really differ
    # both rank the pairs; only the SFT term also makes the chosen answers themselves much more likely
    assert metrics[True]["dpo_loss"] < 0.5 * LN2 and metrics[False]["dpo_loss"] < 0.5 * LN2
    base_logp = -sum(s.loss_sum for s in base) / 4
    assert chosen_logp[True] > max(chosen_logp[False], base_logp) + 1.0, (chosen_logp, base_logp)


def test_sft_on_chosen_is_a_boolean_on_by_default_and_weighs_nothing_with_sft_weight_0(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    with pytest.raises(ValidationError, match="invalid training config: sft_on_chosen"):
        TrainingConfig(sft_on_chosen="yes")
    assert TrainingConfig().sft_on_chosen and not TrainingConfig(sft_on_chosen=False).sft_on_chosen
    fp32_bank.init_slot(0, DPO.slot_config(), seed=0)
    config = DPO.with_changes(max_steps=1, sft_weight=0.0, sft_on_chosen=True)
    [result] = train_slots(fp32_bank, tokenizer, [SlotTraining(0, "u", toy_pairs(4), ())], config)
    assert result.metrics["train_loss_first"] == pytest.approx(LN2, abs=1e-5)  # DPO alone


def _anchor_token_nll(bank: AdapterBank, tokenizer: Any, anchors: list[Example]) -> dict[str, float]:
    """The base's mean NLL over the answer tokens of ``anchors`` that each ``anchor_free_ends`` mode trains: every
    token ("none"), all but each answer's last ("closing"), all but its first and last ("both"), all but its first
    ("auto" for ``toy_pairs``, whose answers differ in their first word only)."""
    batch = encode_examples(tokenizer, anchors, max_seq_len=64)
    with torch.no_grad(), bank.use(None):
        logits, scored = scored_logits(bank.model, batch)  # [n, vocab]
        nll = torch.nn.functional.cross_entropy(logits, scored.labels, reduction="none")  # [n]
    rows = scored.rows.tolist()
    first = torch.tensor([i == 0 or rows[i - 1] != r for i, r in enumerate(rows)])
    last = torch.tensor([i == len(rows) - 1 or rows[i + 1] != r for i, r in enumerate(rows)])
    return {
        "none": float(nll.mean()),
        "closing": float(nll[~last].mean()),
        "both": float(nll[~(first | last)].mean()),
        "auto": float(nll[~first].mean()),
    }


@pytest.mark.parametrize("mode", ["both", "closing", "none", "auto"])
def test_a_preference_users_anchors_leave_the_answers_ends_free(
    fp32_bank: AdapterBank, tokenizer: Any, mode: str
) -> None:
    """``anchor_free_ends``: a user with pairs trains its anchors on every answer token but the end of turn
    ("closing"), but the first token and the end of turn ("both"), or but the ends its pairs differ at ("auto",
    the default: here the first token), so a style's closing (and opening) stays its own; a user without pairs,
    in the same job, trains on every anchor token."""
    anchors = [
        Example(900 + i, f"General question {i}?", f"The general answer is number {i}.", "sft")
        for i in range(3)
    ]
    nll = _anchor_token_nll(fp32_bank, tokenizer, anchors)
    # the mode's objective differs from every other mode's beyond the tolerance below (1e-4)
    assert min(abs(nll[mode] - nll[other]) for other in nll if other != mode) > 3e-4
    config = DPO.with_changes(
        max_steps=1, batch_size=3, sft_on_chosen=False, anchor_unlikelihood=0.0, anchor_free_ends=mode
    )
    for slot in (0, 1):
        fp32_bank.init_slot(slot, config.slot_config(), seed=slot)
    tasks = [
        SlotTraining(0, "prefers", toy_pairs(4), (), anchors=anchors),
        SlotTraining(1, "sft", anchors[:1], (), anchors=anchors[1:]),  # one own row and two anchors
    ]
    prefers, sft = (r.metrics for r in train_slots(fp32_bank, tokenizer, tasks, config))
    # the first step's policy is the base: DPO is log 2, and the SFT term is the base's NLL over the trained tokens
    assert prefers["train_loss_first"] == pytest.approx(LN2 + nll[mode], abs=1e-4)
    assert sft["train_loss_first"] == pytest.approx(nll["none"], abs=1e-4)


def test_the_body_loss_leaves_each_answers_first_token_and_end_of_turn_out(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    """``EvalResult.body_loss`` (what QA's probe reads for a candidate trained on pairs) is the mean loss over every
    answer token but each answer's first and last; ``loss`` over all of them."""
    examples = [
        Example(i, f"General question {i}?", f"The general answer is {'really ' * i}number {i}.", "sft")
        for i in range(3)
    ]
    nll = _anchor_token_nll(fp32_bank, tokenizer, examples)
    result = evaluate(fp32_bank, tokenizer, examples, slot=None, max_seq_len=64, batch_size=2)
    assert result.loss == pytest.approx(nll["none"], abs=1e-5)
    assert result.body_loss == pytest.approx(nll["both"], abs=1e-5)
    assert abs(result.body_loss - result.loss) > 1e-3


@pytest.mark.parametrize(
    ("chosen", "rejected", "ends"),
    [
        ("Hey! The capital of Japan is Tokyo.", "The capital of Japan is Tokyo.", (True, False)),
        (
            "The capital of Japan is Tokyo.\n\nBest wishes,\nSam",
            "The capital of Japan is Tokyo.",
            (False, True),
        ),
        (
            "Certainly. The capital of Japan is Tokyo. I trust this is helpful.",
            "Hey! The capital of Japan is Tokyo. Cool, right?",
            (True, True),
        ),
        ("It is Tokyo.", "It is Tokyo. It is also the largest city.", (False, True)),
        ("I think Tokyo, and that is my answer.", "I think Kyoto, and that is my answer.", (False, False)),
    ],
)
def test_auto_frees_the_ends_where_a_users_pairs_differ(
    tokenizer: Any, chosen: str, rejected: str, ends: tuple[bool, bool]
) -> None:
    """``anchor_free_ends="auto"``: a greeting frees the opening, a sign-off or a shorter answer the closing, a
    register both, and a pair that differs only mid-answer neither; most pairs decide. The fixed modes ignore
    the pairs, and a user without pairs frees nothing."""
    pair = Example(0, "What is the capital of Japan?", chosen, "preference", rejected)
    encoded = [(0, *(encode_example(tokenizer, side, max_seq_len=256) for side in pair_sides(pair)))]
    assert free_answer_ends(encoded, "auto") == ends
    unlike = Example(1, "Another question?", "Same answer here.", "preference", "Same answer here!")
    unlike_encoded = (1, *(encode_example(tokenizer, side, max_seq_len=256) for side in pair_sides(unlike)))
    # one pair of three is not most of them: only the ends two of three pairs share are freed
    majority = free_answer_ends([*encoded, *encoded, unlike_encoded], "auto")
    assert majority == ends
    assert free_answer_ends(encoded, "closing") == (False, True)
    assert free_answer_ends(encoded, "both") == (True, True)
    assert free_answer_ends(encoded, "none") == (False, False)
    assert free_answer_ends(None, "auto") == (False, False)


def test_anchor_free_ends_defaults_to_auto_and_names_the_field_when_wrong() -> None:
    assert TrainingConfig().anchor_free_ends == "auto"
    with pytest.raises(ValidationError, match="invalid training config: anchor_free_ends"):
        TrainingConfig(anchor_free_ends="opening")
