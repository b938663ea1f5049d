"""The issue's useless candidate: an adapter that learned nothing (one training step: its holdout loss may
still sit below the base's) is rejected with ``no-improvement`` and the answer figures, while one trained
normally is promoted on answers it gets right. And a NaN in a candidate's logits is found where it happens."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from qa_helpers import World, feed, register_candidate, train_adapter, user_examples

from lorafleet.adapters.bank import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.qa import matrix as qa_matrix
from lorafleet.qa.facts import fact_prompts
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.serving.decode import BatchDecoder, RowSpec
from lorafleet.training import synthetic
from lorafleet.training.dataset import Example
from lorafleet.workflows.continual import PERSONAL_ADAPTER
from lorafleet.workflows.qa_runner import QARunner

pytestmark = pytest.mark.timeout(300)


def _candidate(world: World, tmp_path: Path, *, steps: int, shuffle: bool = False) -> tuple[int, int]:
    """alice's candidate trained on her feedback (``shuffle``: each question answered with the next topic's
    answer, as a pipeline that misaligned completions with prompts would train it)."""
    ids = feed(world, "alice", round=1, n_records=24)
    adapter = world.registry.get_or_create_adapter(
        tenant_id=world.tenant_id,
        owner_user_id=world.user_id("alice"),
        name=PERSONAL_ADAPTER,
        target_config={
            "rank": world.config.rank,
            "alpha": world.config.alpha,
            "dropout": world.config.dropout,
            "target_modules": world.config.target_modules,
        },
    )
    examples = user_examples(world, "alice")
    if shuffle:
        examples = _shuffled(examples)
    folder = train_adapter(world, examples, work=tmp_path / f"s{steps}", steps=steps)
    version = register_candidate(
        world, adapter_id=adapter.id, folder=folder, record_ids=ids, user_id=world.user_id("alice")
    )
    return adapter.id, version.id


def _shuffled(examples: list[Example]) -> list[Example]:
    """Each example answered with the user's answer of the next topic among the examples' topics."""
    topics = sorted({synthetic.topic_of(e.prompt) for e in examples})
    answers = {synthetic.topic_of(e.prompt): e.completion for e in examples}
    return [
        replace(e, completion=answers[topics[(topics.index(synthetic.topic_of(e.prompt)) + 1) % len(topics)]])
        for e in examples
    ]


def test_the_useless_candidate_is_rejected_with_no_improvement(sqlite_world: World, tmp_path: Path) -> None:
    world = sqlite_world
    _, version_id = _candidate(world, tmp_path, steps=1)
    require = QAPolicy(answer_evidence="require")  # the default only reports the answers (QAPolicy)
    report = QARunner(world.resident, policy=require).run_candidate(
        tenant_id=world.tenant_id, version_id=version_id
    )
    assert report is not None and report.decision == "reject", report
    [reason] = [r for r in report.reasons if r.startswith("no-improvement:")]
    assert "vs base" in reason and "holdout answers" in reason and "p=" in reason, reason
    assert report.summary["rules"]["answers"] is False
    figures = report.summary["answers"]
    assert figures["reference"] == "base" and figures["answers"] > 0 and figures["better"] <= 1
    assert (
        world.registry.get_version_by_id(tenant_id=world.tenant_id, version_id=version_id).status
        == "rejected"
    )


def test_a_candidate_trained_normally_is_promoted_on_its_answers(sqlite_world: World, tmp_path: Path) -> None:
    world = sqlite_world
    _, version_id = _candidate(world, tmp_path, steps=world.config.max_steps)
    report = QARunner(world.resident).run_candidate(tenant_id=world.tenant_id, version_id=version_id)
    assert report is not None and report.decision == "promote", report.reasons
    figures = report.summary["answers"]
    assert figures["answer_f1"] > figures["reference_answer_f1"] and figures["p_value"] <= 0.05, figures
    # it also answered examples of its own training split, and they answer their own questions
    assert figures["training_answers"] == min(16, len(user_examples(world, "alice"))), figures
    assert figures["training_wrong_answers"] <= 4 and report.summary["rules"]["training-answers"], figures
    assert [
        r.decision for r in reports_for_version(world.db, tenant_id=world.tenant_id, version_id=version_id)
    ] == ["promote"]


def test_a_candidate_trained_on_shuffled_answers_is_rejected_for_answering_other_questions(
    sqlite_world: World, tmp_path: Path
) -> None:
    """Issue 16's shuffled completions: QA answers the candidate's own training questions and finds them
    answered with other topics' answers."""
    world = sqlite_world
    _, version_id = _candidate(world, tmp_path, steps=world.config.max_steps, shuffle=True)
    report = QARunner(world.resident).run_candidate(tenant_id=world.tenant_id, version_id=version_id)
    assert report is not None and report.decision == "reject", report.reasons
    [reason] = [r for r in report.reasons if r.startswith("answers-other-questions:")]
    assert "answers to its own training questions answer another question" in reason, reason
    figures = report.summary["answers"]
    assert figures["training_wrong_answers"] > 4 and report.summary["rules"]["training-answers"] is False


def test_decoding_counts_the_steps_whose_logits_are_not_finite(
    fp32_parts: tuple[Backbone, AdapterBank],
) -> None:
    backbone, bank = fp32_parts
    ids = tuple(backbone.tokenizer.encode("Hello there", add_special_tokens=False))
    spec = RowSpec(prompt_ids=ids, routes=(), max_new_tokens=3)
    [clean] = BatchDecoder(bank.model, bank, backbone.tokenizer, device=bank.device).run([spec])
    assert clean.nonfinite_steps == 0
    head = backbone.model.get_output_embeddings()
    saved = head.weight.data[0].clone()
    try:
        head.weight.data[0] = float("nan")  # one vocabulary row: NaN logits at every step
        [broken] = BatchDecoder(bank.model, bank, backbone.tokenizer, device=bank.device).run([spec])
    finally:
        head.weight.data[0] = saved
    # the row ends at its first non-finite step, with the reason (serving turns it into that request's error)
    assert (
        broken.nonfinite_steps == 1 and not broken.token_ids and broken.error == "non-finite logits at step 1"
    )


def test_general_questions_are_answered_by_base_and_candidate_when_asked_for(
    sqlite_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``general_facts`` > 0: QA decodes that many known-answer questions through the candidate alone and the base
    (the base's once per process), stores them in the report and applies the ``general-facts`` rule. The tiny
    random-init base answers none of them right, so there is nothing to keep and the rule passes, saying so."""
    world = sqlite_world
    _, version_id = _candidate(world, tmp_path, steps=world.config.max_steps)
    runner = QARunner(world.resident, policy=QAPolicy(general_facts=5))
    cache: dict[tuple[object, ...], str] = {}
    monkeypatch.setattr(qa_matrix, "_BASE_FACT_ANSWERS", cache)  # this process has not asked the base yet
    report = runner.run_candidate(tenant_id=world.tenant_id, version_id=version_id)
    assert report is not None
    figures = report.summary["answers"]
    assert (figures["general_facts"], figures["general_facts_base_right"]) == (5, 0), figures
    assert report.summary["rules"]["general-facts"] is True
    assert any("the base answers none of 5 general questions right" in r for r in report.reasons), (
        report.reasons
    )
    _, document = load_report(world.db, world.registry, report_id=report.id)
    general = document["matrix"]["answers"]["general"]
    assert [item["prompt"] for item in general] == fact_prompts(5)
    assert all(set(item["outputs"]) == {"candidate", "base"} for item in general)
    # the base's answers are kept for the next QA run of this process, keyed by backbone, device and prompt
    assert sorted(key[-1] for key in cache) == sorted(fact_prompts(5))
    assert [cache[key] for key in sorted(cache, key=lambda k: fact_prompts(5).index(k[-1]))] == [
        item["outputs"]["base"] for item in general
    ]
