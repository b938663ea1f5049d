"""The multi-tenant trainer on the real tiny backbone (fp32 for speed, nf4 where 4-bit matters)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tests.answer_probability import first_answer_probability

from lorafleet.adapters import AdapterBank, SlotPlan, inject_bank
from lorafleet.backbone import load_backbone
from lorafleet.errors import LeaseLostError, TrainingError, ValidationError
from lorafleet.training.anchors import anchor_unlikelihood
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, encode_examples
from lorafleet.training.trainer import (
    SlotTraining,
    evaluate,
    lr_factor,
    personal_tokens,
    train_slots,
    user_losses,
)

FAST = TrainingConfig(
    learning_rate=3e-3, max_steps=6, batch_size=4, max_seq_len=64, rank=4, alpha=8, dropout=0.0
)


def test_three_users_learn_together_on_nf4_and_other_slots_stay_bit_identical(
    tiny_dir: Path, helpers: SimpleNamespace
) -> None:
    backbone = load_backbone(tiny_dir, quantization="nf4", device="cpu")
    bank = inject_bank(backbone, n_slots=5, max_rank=8)
    config = FAST.with_changes(max_steps=30, batch_size=8, dropout=0.05)
    tasks = helpers.synthetic_tasks(bank, config, [0, 1, 2])
    bank.init_slot(3, config.slot_config(), seed=3)
    bystander = helpers.digest(bank.slot_state_dict(3))
    base = helpers.digest(backbone.model.state_dict())
    seen: list[tuple[int, int, dict[str, float]]] = []
    results = train_slots(bank, backbone.tokenizer, tasks, config, progress=lambda *a: seen.append(a))
    assert [(r.slot, r.key) for r in results] == [(0, "user-0"), (1, "user-1"), (2, "user-2")]
    for result, task in zip(results, tasks, strict=True):
        m = result.metrics
        assert m["train_loss"] < m["train_loss_first"] - 0.5, m
        assert m["holdout_loss_after"] < m["holdout_loss_before"] - 0.5, m
        assert m["holdout_token_accuracy_after"] > m["holdout_token_accuracy_before"], m
        assert (m["steps"], m["train_examples"], m["holdout_examples"]) == (
            30,
            len(task.train),
            len(task.holdout),
        )
        assert m["tokens"] > 30 * 8 * 3
    assert helpers.digest(bank.slot_state_dict(3)) == bystander  # not in the job: untouched, bit for bit
    assert helpers.digest(backbone.model.state_dict()) == base  # 4-bit base weights and quant state unchanged
    assert [s[0] for s in seen] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30] and all(s[1] == 30 for s in seen)
    assert set(seen[-1][2]) == {"loss", "lr", "losses"}
    assert set(seen[-1][2]["losses"]) == {"user-0", "user-1", "user-2"}
    assert not backbone.model.training and all(not layer.slot_params for layer in bank.layers.values())


def test_each_user_loss_is_the_mean_over_its_own_tokens(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    """User A's gradient is the same alone or next to user B with 10x more data (no drowning)."""
    for slot in (0, 1):
        fp32_bank.init_slot(slot, FAST.slot_config(), seed=slot)
        with torch.no_grad():  # non-zero B so that A's gradient is not zero
            for layer in fp32_bank.layers.values():
                layer.lora_B[slot].normal_(0, 0.05, generator=torch.Generator().manual_seed(slot))
    a_rows = [Example(1, "Q: my favourite pet?\nA: ", "cat\n", "sft")]
    b_rows = [
        Example(i, f"Tell me a long story number {i}: ", "once upon a time " * 3, "sft") for i in range(10)
    ]

    def grads_of_a(
        examples: list[Example], owners: list[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        params = fp32_bank.trainable_parameters([0, 1])
        batch = encode_examples(tokenizer, examples, max_seq_len=128)
        with fp32_bank.use(SlotPlan.single(owners)):
            losses, tokens = user_losses(fp32_bank.model, batch, torch.tensor(owners), 2)
            losses.sum().backward()
        grads = [p.grad.clone() for p in fp32_bank.trainable_parameters([0]) if p.grad is not None]
        for p in params:
            p.grad = None
        return grads, losses.detach(), tokens

    alone, alone_loss, _ = grads_of_a(a_rows, [0])
    together, together_loss, tokens = grads_of_a(a_rows + b_rows, [0] + [1] * 10)
    assert tokens.tolist() == [5.0, 10 * (len("once upon a time " * 3) + 1)]
    assert torch.allclose(alone_loss[0], together_loss[0], atol=1e-5)
    assert len(alone) == len(together) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(alone, together, strict=True))
    assert sum(float(g.abs().sum()) for g in together) > 0


def test_same_seed_same_weights_and_global_rng_untouched(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    config = FAST.with_changes(dropout=0.1, seed=7)

    def run(seed: int) -> str:
        tasks = helpers.synthetic_tasks(fp32_bank, config, [0, 1])
        train_slots(fp32_bank, tokenizer, tasks, config.with_changes(seed=seed))
        return helpers.digest(
            {**fp32_bank.slot_state_dict(0), **{f"1.{k}": v for k, v in fp32_bank.slot_state_dict(1).items()}}
        )

    rng_before = torch.get_rng_state()
    first = run(7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    fp32_bank.evict_slot(0)
    fp32_bank.evict_slot(1)
    assert run(7) == first
    fp32_bank.evict_slot(0)
    fp32_bank.evict_slot(1)
    assert run(8) != first


def test_non_finite_loss_raises_training_error(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    tasks = helpers.synthetic_tasks(fp32_bank, FAST, [0, 1])
    calls = {"n": 0}

    def poison(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training forwards only (holdout evaluation runs without grad)
            calls["n"] += 1
            if calls["n"] == 3:
                return output * float("nan")
        return output

    handle = fp32_bank.model.get_output_embeddings().register_forward_hook(poison)
    try:
        with pytest.raises(
            TrainingError, match=r"non-finite loss at step 3 for users \['user-0', 'user-1'\]"
        ):
            train_slots(fp32_bank, tokenizer, tasks, FAST)
    finally:
        handle.remove()
    assert all(not layer.slot_params for layer in fp32_bank.layers.values())  # training views released


def test_nan_parent_state_raises_training_error(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    tasks = helpers.synthetic_tasks(fp32_bank, FAST, [0, 1])
    parent = fp32_bank.slot_state_dict(1)
    next(iter(parent.values()))[0, 0] = float("nan")
    tasks[1].parent_state = parent
    with pytest.raises(TrainingError, match=r"non-finite loss at step 1 for users \['user-1'\]"):
        train_slots(fp32_bank, tokenizer, tasks, FAST.with_changes(l2_to_parent=0.1))


def test_should_stop_is_called_every_step_and_its_error_propagates(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    tasks = helpers.synthetic_tasks(fp32_bank, FAST, [0])
    calls: list[int] = []

    def should_stop() -> None:
        calls.append(1)
        if len(calls) == 4:
            raise LeaseLostError("lease lost")

    with pytest.raises(LeaseLostError):
        train_slots(fp32_bank, tokenizer, tasks, FAST, should_stop=should_stop)
    assert len(calls) == 4
    assert not fp32_bank.model.training


def test_l2_pull_keeps_the_adapter_closer_to_its_parent(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    config = FAST.with_changes(max_steps=10)
    distances = {}
    for weight in (0.0, 50.0):
        tasks = helpers.synthetic_tasks(fp32_bank, config, [0])
        with torch.no_grad():  # a parent with non-zero B (as a trained adapter has)
            for layer in fp32_bank.layers.values():
                layer.lora_B[0].normal_(0, 0.05, generator=torch.Generator().manual_seed(9))
        parent = fp32_bank.slot_state_dict(0)
        tasks[0].parent_state = parent
        train_slots(fp32_bank, tokenizer, tasks, config.with_changes(l2_to_parent=weight))
        after = fp32_bank.slot_state_dict(0)
        distances[weight] = math.sqrt(sum(float(((after[k] - parent[k]) ** 2).sum()) for k in parent))
        fp32_bank.evict_slot(0)
    assert 0 < distances[50.0] < 0.5 * distances[0.0], distances


def test_invalid_jobs_are_refused_before_training(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    tasks = helpers.synthetic_tasks(fp32_bank, FAST, [0, 1])
    with pytest.raises(ValidationError, match="at least one task"):
        train_slots(fp32_bank, tokenizer, [], FAST)
    with pytest.raises(ValidationError, match="its own slot"):
        train_slots(fp32_bank, tokenizer, [tasks[0], SlotTraining(0, "other", tasks[1].train, ())], FAST)
    with pytest.raises(ValidationError, match="slot 4 .* is empty"):
        train_slots(fp32_bank, tokenizer, [SlotTraining(4, "u", tasks[0].train, ())], FAST)
    with pytest.raises(ValidationError, match="no training examples"):
        train_slots(fp32_bank, tokenizer, [SlotTraining(0, "u", (), tasks[0].holdout)], FAST)
    bad_parent = {k: v[:1] for k, v in fp32_bank.slot_state_dict(0).items()}
    with pytest.raises(ValidationError, match="parent_state"):
        train_slots(
            fp32_bank, tokenizer, [SlotTraining(0, "u", tasks[0].train, (), parent_state=bad_parent)], FAST
        )


def test_empty_holdout_leaves_holdout_metrics_out(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    tasks = helpers.synthetic_tasks(fp32_bank, FAST, [0])
    (result,) = train_slots(
        fp32_bank, tokenizer, [SlotTraining(0, "u", tasks[0].train, ())], FAST.with_changes(max_steps=2)
    )
    assert result.metrics["holdout_examples"] == 0
    assert not any(k.startswith("holdout_loss") for k in result.metrics)
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_evaluate_base_slot_and_mixture(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    tasks = helpers.synthetic_tasks(fp32_bank, FAST, [0])
    base = evaluate(fp32_bank, tokenizer, tasks[0].holdout, slot=None, max_seq_len=64)
    fresh = evaluate(fp32_bank, tokenizer, tasks[0].holdout, slot=0, max_seq_len=64)
    assert base.examples == len(tasks[0].holdout) and base.tokens > base.examples
    assert fresh.loss == pytest.approx(base.loss, abs=1e-5)  # a fresh slot has B = 0: the base model
    train_slots(fp32_bank, tokenizer, tasks, FAST)
    trained = evaluate(fp32_bank, tokenizer, tasks[0].holdout, slot=0, max_seq_len=64, batch_size=3)
    mixed = evaluate(fp32_bank, tokenizer, tasks[0].holdout, slot=None, max_seq_len=64, mixture=[(0, 1.0)])
    assert trained.loss < base.loss
    assert mixed.loss == pytest.approx(trained.loss, abs=1e-4)
    empty = evaluate(fp32_bank, tokenizer, [], slot=0, max_seq_len=64)
    assert empty.tokens == 0 and math.isnan(empty.loss)
    with pytest.raises(ValidationError, match="not both"):
        evaluate(fp32_bank, tokenizer, tasks[0].holdout, slot=0, max_seq_len=64, mixture=[(0, 1.0)])


def test_learning_rate_warms_up_then_decays_on_a_cosine() -> None:
    factors = [lr_factor(step, total=20, warmup_ratio=0.1) for step in range(20)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert 0 < factors[-1] < 0.01
    assert lr_factor(0, total=5, warmup_ratio=0.0) == 1.0


def test_min_epochs_trains_more_steps_when_a_job_has_more_rows(
    fp32_bank: AdapterBank, tokenizer: Any, helpers: SimpleNamespace
) -> None:
    """The steps a job runs are its config's ``steps_for`` the largest user's rows (examples and anchors)."""
    config = FAST.with_changes(max_steps=2, batch_size=4, min_epochs=2.0)
    tasks = helpers.synthetic_tasks(fp32_bank, config, [0, 1])
    rows = max(len(t.train) + len(t.anchors) for t in tasks)
    results = train_slots(fp32_bank, tokenizer, tasks, config)
    assert rows > 4 and all(r.metrics["steps"] == config.steps_for(rows) > 2 for r in results)


def test_a_continuing_task_trains_its_own_passes(
    fp32_bank: AdapterBank, tokenizer: Any, helpers: SimpleNamespace
) -> None:
    """A task that continues a parent takes ``continual_min_epochs`` passes; the job runs the most any task needs."""
    config = FAST.with_changes(max_steps=2, batch_size=4, min_epochs=1.0, continual_min_epochs=3.0)
    first, second = helpers.synthetic_tasks(fp32_bank, config, [0, 1])
    continuing = dataclasses.replace(second, continues=True)
    rows = len(continuing.train) + len(continuing.anchors)
    steps = config.steps_for(rows, continuing=True)
    assert steps > config.steps_for(len(first.train) + len(first.anchors))
    results = train_slots(fp32_bank, tokenizer, [first, continuing], config)
    assert [r.metrics["steps"] for r in results] == [steps, steps]


def test_anchor_unlikelihood_pushes_the_users_own_tokens_down_on_general_prompts(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    """With the term on, the adapter gives its user's answer tokens less probability on the anchors' answers than
    the same job without it, and still learns the user's answers."""
    train = [Example(i, f"Q: what is my pet called, take {i}?\nA: ", "Zorb Quix.", "sft") for i in range(8)]
    anchors = [
        Example(100 + i, f"Q: {q}?\nA: ", a, "sft")
        for i, (q, a) in enumerate(
            [("sky colour", "the sky is blue."), ("two and two", "that is four."), ("sea", "the sea is wet.")]
        )
    ]
    config = FAST.with_changes(max_steps=40, batch_size=6)
    task = SlotTraining(0, "ada", train, train[:2], anchors=anchors)
    own = personal_tokens(tokenizer, [task], config, torch.device("cpu"))[0]  # on by default
    assert own is not None
    general = "".join(e.completion for e in anchors) + "".join(e.prompt for e in [*train, *anchors])
    answer_bytes = set(b"Zorb Quix.") - set(general.encode())  # what no prompt and no anchor answer uses
    assert answer_bytes == set(b"Zx")
    # the byte tokenizer's ids are offset from the bytes: compare through the tokenizer
    assert set(own.tolist()) == {
        tokenizer(chr(b), add_special_tokens=False)["input_ids"][0] for b in answer_bytes
    }
    off = config.with_changes(anchor_unlikelihood=0.0)
    assert personal_tokens(tokenizer, [task], off, torch.device("cpu")) == [None]
    # a preference pair's chosen answer is the user's own unless DPO trains it (a style, kept by DPO's reference)
    pair = Example(50, "Q: sign off?\nA: ", "Yours, J.", "preference", rejected="Bye.")
    with_pair = SlotTraining(0, "ada", [*train, pair], train[:2], anchors=anchors)
    j = tokenizer("J", add_special_tokens=False)["input_ids"][0]
    for dpo_weight, has_j in ((0.0, True), (1.0, False)):
        tokens = personal_tokens(
            tokenizer, [with_pair], config.with_changes(dpo_weight=dpo_weight), torch.device("cpu")
        )[0]
        assert tokens is not None and (j in tokens.tolist()) == has_j

    probability, losses = {}, {}
    for weight in (0.0, 5.0):
        fp32_bank.init_slot(0, config.slot_config(), seed=0)
        result = train_slots(fp32_bank, tokenizer, [task], config.with_changes(anchor_unlikelihood=weight))
        probability[weight] = first_answer_probability(fp32_bank, tokenizer, anchors, own)
        losses[weight] = result[0].metrics["holdout_loss_after"]
        fp32_bank.evict_slot(0)
    assert probability[5.0] < 0.8 * probability[0.0], probability
    assert losses[5.0] < losses[0.0] + 0.05, losses  # the user's own answers are learnt as well


def test_anchor_unlikelihood_is_minus_log_one_minus_the_personal_probability() -> None:
    """Each user's term is the mean over its anchor rows' positions of ``-log(1 - p(personal tokens))``; rows that
    are not anchors and users without personal tokens add nothing."""
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))  # [positions, vocab]
    token_rows = torch.tensor([0, 0, 1, 1, 2, 3])  # rows 0-1 are user 0's, rows 2-3 user 1's
    owner = torch.tensor([0, 0, 1, 1])
    anchor_rows = torch.tensor([False, True, True, True])
    personal = [torch.tensor([2, 5]), None]
    got = anchor_unlikelihood(logits, token_rows, owner, anchor_rows, personal)
    p = logits[2:4].softmax(-1)[:, [2, 5]].sum(-1)  # user 0's anchor row is row 1: positions 2 and 3
    assert torch.allclose(got, torch.stack([-torch.log1p(-p).mean(), torch.tensor(0.0)]), atol=1e-6)


def test_anchor_unlikelihood_leaves_out_a_value_once_it_has_begun() -> None:
    """With ``labels``, a position trained towards a personal token right after another one of the same row (the
    rest of a value a contrast row's answer has begun) is left out; the value's first token and the positions of
    other rows are kept."""
    logits = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))  # [positions, vocab]
    token_rows = torch.tensor([0, 0, 0, 0, 1, 1, 1])  # one user's two anchor rows
    labels = torch.tensor([4, 2, 5, 5, 5, 7, 2])  # row 0: "4 | 2 5 | 5", row 1: "5 | 7 2"; personal {2, 5}
    owner, anchor_rows, personal = torch.tensor([0, 0]), torch.tensor([True, True]), [torch.tensor([2, 5])]
    got = anchor_unlikelihood(logits, token_rows, owner, anchor_rows, personal, labels=labels)
    kept = torch.tensor([0, 1, 4, 5, 6])  # positions 2 and 3 continue the value that began at 1
    p = logits[kept].softmax(-1)[:, [2, 5]].sum(-1)
    assert torch.allclose(got, -torch.log1p(-p).mean().reshape(1), atol=1e-6)
    # without labels: every position
    every = anchor_unlikelihood(logits, token_rows, owner, anchor_rows, personal)
    p_all = logits.softmax(-1)[:, [2, 5]].sum(-1)
    assert torch.allclose(every, -torch.log1p(-p_all).mean().reshape(1), atol=1e-6)


def test_lora_plus_steps_the_b_matrices_at_the_ratio_and_the_a_matrices_as_before(
    fp32_bank: AdapterBank, helpers: SimpleNamespace, tokenizer: Any
) -> None:
    # Adam's update is the learning rate times about the sign of the gradient, whatever its scale. From a fresh
    # slot (B = 0) the first step moves B ratio times as far as with one learning rate, and A not at all (its
    # gradient is zero while B is); the second step moves A, by the same amount at either ratio
    config = FAST.with_changes(warmup_ratio=0.0)

    def moved(ratio: float, steps: int) -> dict[str, torch.Tensor]:
        tasks = helpers.synthetic_tasks(fp32_bank, config, [0])
        start = fp32_bank.slot_state_dict(0)
        train_slots(fp32_bank, tokenizer, tasks, config.with_changes(lr_ratio_b=ratio, max_steps=steps))
        after = fp32_bank.slot_state_dict(0)
        fp32_bank.evict_slot(0)
        return {k: after[k] - start[k] for k in start}

    one, four = moved(1.0, 1), moved(4.0, 1)
    b_keys, a_keys = [k for k in one if "lora_B" in k], [k for k in one if "lora_A" in k]
    assert b_keys and a_keys
    for k in a_keys:
        assert not one[k].any() and not four[k].any(), k
    for k in b_keys:
        assert one[k].abs().max() > 0, k
        torch.testing.assert_close(four[k], 4.0 * one[k], rtol=1e-4, atol=1e-7)
    one, four = moved(1.0, 2), moved(4.0, 2)
    a_one = torch.cat([one[k].abs().flatten() for k in a_keys]).median()
    a_four = torch.cat([four[k].abs().flatten() for k in a_keys]).median()
    assert a_one > 0 and 0.8 < float(a_four / a_one) < 1.25, (a_one, a_four)
