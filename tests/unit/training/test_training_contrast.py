"""Contrast rows (``lorafleet.training.contrast``): a user's questions asked about a third party, trained as anchors
with no likelihood on the user's answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.answer_probability import first_answer_probability

from lorafleet.adapters import AdapterBank
from lorafleet.training.config import TrainingConfig
from lorafleet.training.contrast import CONTRAST_KIND, contrast_examples, third_person
from lorafleet.training.dataset import Example
from lorafleet.training.personal_facts import KINDS
from lorafleet.training.trainer import (
    SlotTraining,
    _Frozen,
    _Rows,
    _stream,
    anchor_targets,
    personal_tokens,
    train_slots,
)

TRAIN = [Example(i, f"Q: what is my pet called, take {i}?\nA: ", "Zorb Quix.", "sft") for i in range(8)]
GENERAL = [
    Example(100 + i, f"Q: {q}?\nA: ", a, "sft")
    for i, (q, a) in enumerate(
        [("sky colour", "the sky is blue."), ("two and two", "that is four."), ("sea", "the sea is wet.")]
    )
]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Where do I live?", "Where does Sam live?"),
        ("What's my pet called?", "What's Sam's pet called?"),
        ("What kind of diet am I on?", "What kind of diet is Sam on?"),
        ("Do I follow any special diet?", "Does Sam follow any special diet?"),
        ("What's the sport I'm passionate about?", "What's the sport Sam is passionate about?"),
        ("Tell me my favourite sport.", "Tell me Sam's favourite sport."),  # "me" is the one asking
        ("My sign-off, please.", "Sam's sign-off, please."),
    ],
)
def test_third_person_moves_the_question_to_someone_else(prompt: str, expected: str) -> None:
    assert third_person(prompt, "Sam") == expected


def test_a_prompt_without_a_first_person_word_gives_no_row() -> None:
    assert third_person("What is the capital of Spain?", "Sam") is None
    assert third_person("Tell me a joke.", "Sam") is None
    assert third_person("Summarise this: Myriad items in Mine Street.", "Sam") is None  # whole words only


def test_every_shipped_personal_question_is_rewritten() -> None:
    """The rule covers every phrasing of the shipped personal facts: no first-person "I"/"my" is left."""
    for kind in KINDS:
        for question in kind.questions:
            rewritten = third_person(question, "Sam")
            assert rewritten is not None, question
            assert not {"I", "my", "My", "I'm"} & set(rewritten.replace("?", " ").replace(".", " ").split())


def test_contrast_examples_keep_the_answer_and_skip_what_cannot_be_rewritten() -> None:
    train = [
        Example(1, "Where do I live?", "You live in Galway.", "sft"),
        Example(2, "What is 2 + 2?", "4.", "sft"),  # no first person
        Example(
            3, "What's my pet called?", "Bramble.", "preference", rejected="Rex."
        ),  # a pair: not an answer
        Example(4, "What's my pet called?", "Your pet is Bramble.", "sft"),
        Example(5, "What's my diet?", "Vegan.", "sft"),
    ]
    rows = contrast_examples(train, first_id=900, limit=2)
    assert [(r.record_id, r.prompt, r.completion, r.kind) for r in rows] == [
        (900, "Where does Sam live?", "You live in Galway.", CONTRAST_KIND),
        (901, "What's Alex's pet called?", "Your pet is Bramble.", CONTRAST_KIND),
    ]


def test_the_trainer_puts_no_likelihood_on_a_contrast_row_and_keeps_its_tokens_personal(
    tokenizer: Any,
) -> None:
    """A contrast row is an anchor (the unlikelihood and distillation see it) whose completion is not a target, and
    its completion, the user's own answer, does not take the user's tokens out of the personal set."""
    config = TrainingConfig(max_steps=2, batch_size=8, max_seq_len=64, rank=4, alpha=8)
    train = [Example(i, f"Q: what is my pet called, take {i}?\nA: ", "Zorb Quix.", "sft") for i in range(3)]
    general = [Example(100, "Q: sky colour?\nA: ", "the sky is blue.", "sft")]
    contrast = contrast_examples(train[:1], first_id=200)
    assert [r.prompt for r in contrast] == ["Q: what is Sam's pet called, take 0?\nA: "]
    task = SlotTraining(0, "ada", train, train[:1], anchors=[*general, *contrast])
    stream = _stream(tokenizer, task, config)
    assert stream is not None and stream.unlikely_only == {4} and stream.anchors_from == 3
    packed = _Rows()
    packed.add_sft(0, stream, len(stream.encoded))
    flags = {
        kind: (sft, anchor)
        for row, sft, anchor in zip(packed.rows, packed.sft, packed.anchor, strict=True)
        for kind, encoded in (("contrast", stream.encoded[4]), ("general", stream.encoded[3]))
        if row == encoded
    }
    assert flags == {"contrast": (False, True), "general": (True, True)}
    assert sum(packed.sft) == len(train) + len(general)

    cpu = torch.device("cpu")
    without = SlotTraining(0, "ada", train, train[:1], anchors=general)
    own, own_without = (personal_tokens(tokenizer, [t], config, cpu)[0] for t in (task, without))
    assert own is not None and own_without is not None
    assert set(own.tolist()) == set(own_without.tolist())


def test_distillation_skips_contrast_rows_wherever_they_stand(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    """The base's targets are computed for the general anchors only, and each general anchor row finds its own
    targets with a contrast row between them (a job with the distillation on trains without a shape error)."""
    config = TrainingConfig(max_steps=2, batch_size=6, max_seq_len=64, rank=4, alpha=8, anchor_distill=0.5)
    [contrast] = contrast_examples(TRAIN[:1], first_id=200)
    task = SlotTraining(0, "ada", TRAIN, TRAIN[:2], anchors=[GENERAL[0], contrast, GENERAL[1]])
    stream = _stream(tokenizer, task, config)
    assert stream is not None and stream.anchors_from == 8
    assert [stream.anchor_index(i) for i in range(7, 11)] == [None, 0, None, 1]
    assert stream.distilled() == [stream.encoded[8], stream.encoded[10]]
    fp32_bank.init_slot(0, config.slot_config(), seed=0)
    [targets] = anchor_targets(fp32_bank, [stream], [task], config, 0, _Frozen(None, 0))
    assert targets is not None and [t.top_ids.shape[0] for t in targets] == [
        stream.encoded[i][1] for i in (8, 10)
    ]  # one target row per scored answer token of each general anchor
    result = train_slots(fp32_bank, tokenizer, [task], config)
    assert result[0].metrics["anchor_examples"] == 3


def test_contrast_rows_teach_whose_fact_it_is(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    """Against the same job without them, contrast rows make the user's answer less likely on unseen questions
    about someone else, and the user's own answers are learnt as well."""
    config = TrainingConfig(
        learning_rate=1e-2, max_steps=100, batch_size=6, max_seq_len=64, rank=4, alpha=8, dropout=0.0
    )
    unseen = contrast_examples(
        [Example(50 + i, f"Q: what is my pet called, take {i}?\nA: ", "Zorb Quix.", "sft") for i in (8, 9)],
        first_id=300,
    )
    probability, losses = {}, {}
    for arm, anchors in (("without", GENERAL), ("with", [*GENERAL, *contrast_examples(TRAIN, first_id=200)])):
        task = SlotTraining(0, "ada", TRAIN[2:], TRAIN[:2], anchors=anchors)
        own = personal_tokens(tokenizer, [task], config, torch.device("cpu"))[0]
        assert own is not None
        fp32_bank.init_slot(0, config.slot_config(), seed=0)
        result = train_slots(fp32_bank, tokenizer, [task], config)
        probability[arm] = first_answer_probability(fp32_bank, tokenizer, unseen, own)
        losses[arm] = result[0].metrics["holdout_loss_after"]
        fp32_bank.evict_slot(0)
    assert probability["with"] < 0.8 * probability["without"], probability
    assert losses["with"] < losses["without"] + 0.1, losses
