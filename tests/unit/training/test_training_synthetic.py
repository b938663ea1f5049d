"""The synthetic personalisation task: its design invariants, its chance level, and that it is learnable."""

from __future__ import annotations

import statistics
from types import SimpleNamespace
from typing import Any

import pytest

from lorafleet.adapters import AdapterBank
from lorafleet.errors import ValidationError
from lorafleet.feedback import validate_feedback_batch
from lorafleet.training import synthetic
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import build_dataset
from lorafleet.training.trainer import train_slots


def test_design_invariants() -> None:
    assert len(synthetic.TOPICS) == 12 and all(
        len(a) == synthetic.N_ANSWERS for a in synthetic.TOPICS.values()
    )
    for (
        answers
    ) in synthetic.TOPICS.values():  # the first letter decides the answer: teacher-forced chance 1/8
        assert len({a[0] for a in answers}) == synthetic.N_ANSWERS
    rounds = [set(synthetic.round_topics(r)) for r in (1, 2, 3)]
    assert set().union(*rounds) == set(synthetic.TOPICS) and sum(len(r) for r in rounds) == 12
    for topic in synthetic.TOPICS:
        for t in range(len(synthetic.TEMPLATES)):
            for o in range(len(synthetic.OPENERS)):
                assert synthetic.topic_of(synthetic.prompt_for(topic, template=t, opener=o)) == topic
    with pytest.raises(ValidationError):
        synthetic.round_topics(4)


def test_preferences_are_private_and_seeded_by_user() -> None:
    assert synthetic.user_preferences("alice") == synthetic.user_preferences("alice")
    prefs = [synthetic.user_preferences(f"user-{i}") for i in range(200)]
    agreement = statistics.mean(p["color"] == q["color"] for p, q in zip(prefs, prefs[1:], strict=False))
    assert 0.05 < agreement < 0.22  # independent users agree 1 time in 8


def test_records_are_valid_distinct_and_about_the_round() -> None:
    records = synthetic.make_user_records("alice", round=2, n_records=60, seed=1)
    assert len(validate_feedback_batch(records)) == 60
    assert len({(r["prompt"], r["completion"]) for r in records}) == 60
    prefs = synthetic.user_preferences("alice")
    for record in records:
        topic = synthetic.topic_of(record["prompt"])
        assert topic in synthetic.round_topics(2) and record["metadata"]["topic"] == topic
        assert record["completion"] == prefs[topic] + "\n"
        assert prefs[topic] not in record["prompt"]  # nothing in the prompt gives the answer away
    assert synthetic.make_user_records("alice", round=2, n_records=60, seed=1) == records
    with pytest.raises(ValidationError):
        synthetic.make_user_records("alice", round=1, n_records=500)


def test_holdout_asks_about_topics_seen_in_training() -> None:
    config = TrainingConfig()
    for user in range(5):
        raw = synthetic.make_user_records(f"user-{user}", round=1, n_records=64)
        dataset = build_dataset(synthetic.to_feedback_records(raw), config=config)
        assert dataset.holdout and len(dataset.train) > 2 * len(dataset.holdout)
        trained_topics = {synthetic.topic_of(e.prompt) for e in dataset.train}
        assert {synthetic.topic_of(e.prompt) for e in dataset.holdout} <= trained_topics
        assert not {e.prompt for e in dataset.holdout} & {e.prompt for e in dataset.train}


def test_base_model_is_at_chance(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    choice, answer = [], []
    for user in range(16):
        raw = synthetic.make_user_records(f"user-{user}", round=1, n_records=12)
        examples = build_dataset(
            synthetic.to_feedback_records(raw), config=TrainingConfig(holdout_fraction=0)
        ).train
        scores = synthetic.evaluate_personalisation(fp32_bank, tokenizer, examples, slot=None)
        choice.append(scores.choice_accuracy)
        answer.append(scores.answer_accuracy)
    assert 0.0 <= statistics.mean(choice) < 0.3  # expected 1/8
    assert statistics.mean(answer) < 0.05  # the random base does not even know the answers


def test_adapters_learn_their_user_and_stay_at_chance_on_others(
    fp32_bank: AdapterBank, tokenizer: Any, helpers: SimpleNamespace
) -> None:
    config = TrainingConfig(learning_rate=3e-3, max_steps=120, batch_size=8, max_seq_len=64, dropout=0.0)
    tasks = helpers.synthetic_tasks(fp32_bank, config, [0, 1, 2], n_records=64)
    train_slots(fp32_bank, tokenizer, tasks, config)
    for task in tasks:
        own = synthetic.evaluate_personalisation(fp32_bank, tokenizer, task.holdout, slot=task.slot)
        assert own.choice_accuracy >= 0.8 and own.token_accuracy >= 0.8, (task.key, own)
    prefs = [synthetic.user_preferences(t.key) for t in tasks]
    for a, b in ((0, 1), (1, 2), (2, 0)):
        cross = synthetic.evaluate_personalisation(fp32_bank, tokenizer, tasks[b].holdout, slot=tasks[a].slot)
        shared = {t for t in synthetic.round_topics(1) if prefs[a][t] == prefs[b][t]}
        same_answer = statistics.mean(synthetic.topic_of(e.prompt) in shared for e in tasks[b].holdout)
        assert cross.choice_accuracy <= same_answer + 0.25, (a, b, cross)  # right only where tastes agree
