"""Evaluating the QA matrix on the resident backbone and adapter bank.

Every version a column needs is loaded into a free slot of the host's bank once (``SlotLoader``, evicted
afterwards whatever happens, so the trainer finds the bank as it left it). A column is either fixed routes
(base, one adapter alone, a 50/50 mixture) or a gated bank: the user's gate decides each example's routes from
the pooled base embedding of its prompt, exactly as serving decides a request's, so different rows of one
batch take different adapters. All columns of one evaluation set are scored in one ``score_examples`` pass
(per-row routes), and the greedy samples of the whole matrix are decoded in one batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.backbone.chat import has_chat_template
from lorafleet.domain import AdapterVersion
from lorafleet.domain.closing import ClosesOnExit
from lorafleet.qa.evalsets import EvalSet
from lorafleet.qa.facts import FACT_MAX_NEW_TOKENS, KNOWN_ANSWERS, fact_prompts
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.results import (
    BASE,
    CANDIDATE,
    PREVIOUS,
    AnswerItem,
    Answers,
    Cell,
    ColumnInfo,
    Matrix,
    Preferences,
    Sample,
)
from lorafleet.training.dataset import Example, encode_prompt

if TYPE_CHECKING:
    import torch

    from lorafleet.adapters import AdapterBank
    from lorafleet.adapters.prefix import FrozenPrefix
    from lorafleet.backbone import Backbone
    from lorafleet.registry import Registry
    from lorafleet.routing.experts import ExpertSet
    from lorafleet.routing.gates import Gate
    from lorafleet.serving.decode import RowOutput, RowSpec
    from lorafleet.training.metrics import ExampleScore

logger = logging.getLogger(__name__)
#: ``(slot, weight)`` pairs of one example (empty: the base model)
Routes = list[tuple[int, float]]
#: the base model's scores of probe examples by (backbone, device, max_seq_len, prompt, completion): the probe set
#: and its base column are the same in every QA run of a process, so each is scored once (a few dozen entries)
_BASE_PROBE_SCORES: dict[tuple[object, ...], ExampleScore] = {}
#: the base model's greedy answers to the general questions with known answers, by (backbone, device, prompt):
#: the same in every QA run of a process, so each is decoded once
_BASE_FACT_ANSWERS: dict[tuple[object, ...], str] = {}


@dataclass(frozen=True)
class GatedExperts:
    """A bank the gate routes over; ``handles[i]`` names the loaded version of ``bank.members[i]``."""

    bank: ExpertSet
    gate: Gate
    handles: tuple[str, ...]


@dataclass(frozen=True)
class ColumnSpec:
    """A configuration: fixed ``routes`` (handle, weight) or, with ``gated``, the gate's routes per example."""

    info: ColumnInfo
    routes: tuple[tuple[str, float], ...] = ()
    gated: GatedExperts | None = None


class SlotLoader(ClosesOnExit):
    """Loads versions into free slots of a bank by handle (``candidate``, ``member:<id>``), evicts on exit."""

    def __init__(self, *, bank: AdapterBank, registry: Registry, work: Path) -> None:
        self.bank, self.registry, self.work = bank, registry, work
        self.slots: dict[str, int] = {}

    def load(self, handle: str, version: AdapterVersion, *, folder: Path | None = None) -> int:
        """Load a version (``folder``: already fetched; else fetched, sha256-verified); the fingerprint must be
        this bank's."""
        from lorafleet.adapters import load_slot_from_dir  # torch, on first use

        if folder is None:
            folder = self.registry.fetch_version(
                version=version, dest_dir=self.work / f"version-{version.id}"
            )
        slot = self.bank.free_slot()
        load_slot_from_dir(self.bank, slot, folder, require_fingerprint=True, name=f"qa-{handle}")
        self.slots[handle] = slot
        return slot

    def close(self) -> None:
        """Evict every loaded version (what leaving the ``with`` block calls)."""
        for slot in self.slots.values():
            self.bank.evict_slot(slot)
        self.slots.clear()


def embed_sets(backbone: Backbone, bank: AdapterBank, sets: Sequence[EvalSet]) -> dict[str, torch.Tensor]:
    """Pooled base embeddings of each set's prompts ``[examples, hidden]`` (sets without examples left out)."""
    from lorafleet.routing.embeddings import embed_prompts  # torch, on first use

    return {s.name: embed_prompts(backbone, bank, [e.prompt for e in s.examples]) for s in sets if s.examples}


def gate_routes(gated: GatedExperts, embeddings: torch.Tensor, slots: Mapping[str, int]) -> list[Routes]:
    """Each example's ``(slot, weight)`` routes from the gate's decision over the bank."""
    decisions = gated.gate.decide(gated.bank, embeddings)
    slot_of_member = [slots[h] for h in gated.handles]
    return [d.to_slots(slot_of_member) for d in decisions]


def gate_traffic(gated: GatedExperts, embeddings: torch.Tensor) -> dict[int, float]:
    """Total gate weight each member (by adapter id) receives over ``embeddings`` (no weights loaded)."""
    traffic: dict[int, float] = {}
    for decision in gated.gate.decide(gated.bank, embeddings):
        for index, weight in decision.routes:
            adapter_id = gated.bank.members[index].adapter_id
            traffic[adapter_id] = traffic.get(adapter_id, 0.0) + float(weight)
    return traffic


def evaluate_matrix(
    *,
    backbone: Backbone,
    bank: AdapterBank,
    sets: Sequence[EvalSet],
    columns: Sequence[ColumnSpec],
    slots: Mapping[str, int],
    policy: QAPolicy,
    prefix: FrozenPrefix | None = None,
    answers: tuple[str, str] | None = None,
    answer_source: str = "holdout",
    preference_beta: float | None = None,
    training: EvalSet | None = None,
) -> Matrix:
    """Loss and token accuracy of every column on every set, plus greedy samples per cell.

    With ``prefix``, a row's layers below the lowest adapted one run once for all its columns. With ``answers``
    ``(subject column, reference column)``, every example of the own set is also answered greedily by both
    columns (``Matrix.answers``: the answer rule's evidence), and the examples of ``training`` (the candidate's own
    training split) by the subject column alone, in the same batch. With ``preference_beta``, the own set's preference
    pairs are scored by the base, candidate and previous columns (``Matrix.preferences``: the preference rule's).
    """
    embeddings = embed_sets(backbone, bank, sets) if any(c.gated for c in columns) else {}
    routes = {s.name: _set_routes(s, columns, slots, embeddings) for s in sets}
    cells: dict[str, dict[str, Cell]] = {}
    for s in sets:
        cells[s.name] = _score_set(backbone, bank, s, columns, routes[s.name], policy, prefix)
    samples = _greedy_samples(backbone, bank, sets, columns, routes, policy)
    for (row, column), kept in samples.items():
        cell = cells[row][column]
        cells[row][column] = replace(cell, samples=kept)
    evidence = None
    own = next((s for s in sets if s.own and s.examples), None)
    if answers is not None and own is not None:
        trained = training.examples if training is not None else ()
        # a candidate trained on pairs answers general questions for the looping rule even with general_facts 0
        questions = max(policy.general_facts, policy.looping_questions if preference_beta is not None else 0)
        evidence = _answers(
            backbone, bank, own, answers, routes[own.name], policy, answer_source, trained, questions
        )
    preferences = None
    if preference_beta is not None and own is not None:
        preferences = _preferences(
            backbone, bank, own, columns, routes[own.name], policy, prefix, preference_beta
        )
    return Matrix(tuple(s.info() for s in sets), tuple(c.info for c in columns), cells, evidence, preferences)


def _preferences(
    backbone: Backbone,
    bank: AdapterBank,
    own: EvalSet,
    columns: Sequence[ColumnSpec],
    routes: Mapping[str, list[Routes]],
    policy: QAPolicy,
    prefix: FrozenPrefix | None,
    beta: float,
) -> Preferences | None:
    """The own set's preference pairs through the base, the candidate and the previous version, in one pass; each
    column's share of pairs whose implicit reward margin against the base is > 0 (None: no pairs)."""
    from lorafleet.training.preference import dpo_terms, is_pair, pair_logps, preference_accuracy  # torch

    index = [i for i, e in enumerate(own.examples) if is_pair(e)]
    if not index:
        return None
    pairs = [own.examples[i] for i in index]
    compared = [c.info.name for c in columns if c.info.name in (CANDIDATE, PREVIOUS)]
    all_routes: list[Routes] = [[] for _ in pairs]
    all_routes += [routes[name][i] for name in compared for i in index]
    logps = pair_logps(
        bank,
        backbone.tokenizer,
        pairs * (1 + len(compared)),
        all_routes,
        max_seq_len=policy.max_seq_len,
        prefix=prefix,
    )  # [pairs * (1 + columns), 2]
    n = len(pairs)
    base = logps[:n]
    accuracy, margin = {BASE: 0.5}, {BASE: 0.0}
    for k, name in enumerate(compared):
        column = logps[(k + 1) * n : (k + 2) * n]
        margins = dpo_terms(*column.T, *base.T, beta=beta).margins  # [pairs]
        accuracy[name], margin[name] = preference_accuracy(margins), float(margins.mean())
    return Preferences(own.name, n, beta, accuracy, margin)


def _set_routes(
    s: EvalSet,
    columns: Sequence[ColumnSpec],
    slots: Mapping[str, int],
    embeddings: Mapping[str, torch.Tensor],
) -> dict[str, list[Routes]]:
    """Per column, one route list per example of the set."""
    out: dict[str, list[Routes]] = {}
    for column in columns:
        if column.gated is not None and s.examples:
            out[column.info.name] = gate_routes(column.gated, embeddings[s.name], slots)
        else:
            fixed = [(slots[h], w) for h, w in column.routes]
            out[column.info.name] = [list(fixed) for _ in s.examples]
    return out


def _score_set(
    backbone: Backbone,
    bank: AdapterBank,
    s: EvalSet,
    columns: Sequence[ColumnSpec],
    routes: Mapping[str, list[Routes]],
    policy: QAPolicy,
    prefix: FrozenPrefix | None,
) -> dict[str, Cell]:
    """Every column on one set in one pass (each example repeated once per column, with that column's routes)."""
    from lorafleet.training.metrics import score_examples, summarize  # torch, on first use

    if not s.examples:
        return {c.info.name: Cell(math.nan, math.nan, 0, 0) for c in columns}
    rows, where = _distinct_rows(s, columns, routes)
    keys = _probe_base_keys(backbone, bank, s, rows, policy)  # row -> cache key: the probe's base rows
    known = {j: _BASE_PROBE_SCORES[key] for j, key in keys.items() if key in _BASE_PROBE_SCORES}
    todo = [j for j in range(len(rows)) if j not in known]
    scored = score_examples(
        bank,
        backbone.tokenizer,
        [s.examples[rows[j][0]] for j in todo],
        [list(rows[j][1]) for j in todo],
        max_seq_len=policy.max_seq_len,
        batch_size=policy.batch_size,
        prefix=prefix,
    )
    distinct = {**known, **dict(zip(todo, scored, strict=True))}
    _BASE_PROBE_SCORES.update((key, distinct[j]) for j, key in keys.items())
    scores = [distinct[j] for j in where]
    n, out = len(s.examples), {}
    for i, column in enumerate(columns):
        part = scores[i * n : (i + 1) * n]
        result = summarize(part)
        out[column.info.name] = Cell(
            result.loss,
            result.token_accuracy,
            result.tokens,
            result.examples,
            nonfinite=sum(score.nonfinite for score in part),
            body_loss=result.body_loss,
        )
    return out


def _probe_base_keys(
    backbone: Backbone,
    bank: AdapterBank,
    s: EvalSet,
    rows: Sequence[tuple[int, tuple[tuple[int, float], ...]]],
    policy: QAPolicy,
) -> dict[int, tuple[object, ...]]:
    """The ``_BASE_PROBE_SCORES`` key of each of ``rows`` that is the base model on a probe example (none when
    ``s`` is not the probe set)."""
    if s.kind != "probe":
        return {}
    place = (backbone.fingerprint.digest, backbone.quantization, str(bank.device), policy.max_seq_len)
    return {
        j: (*place, s.examples[i].prompt, s.examples[i].completion) for j, (i, r) in enumerate(rows) if not r
    }


def _distinct_rows(
    s: EvalSet, columns: Sequence[ColumnSpec], routes: Mapping[str, list[Routes]]
) -> tuple[list[tuple[int, tuple[tuple[int, float], ...]]], list[int]]:
    """The distinct ``(example index, routes)`` rows of every column on ``s``, and for each column's example in
    turn the index of its row: columns that route an example alike (the base's empty routes, a bank of one member
    that its gate routes wholly to it) score it once."""
    rows: dict[tuple[int, tuple[tuple[int, float], ...]], int] = {}
    where = [
        rows.setdefault((i, tuple((slot, weight) for slot, weight in r)), len(rows))
        for c in columns
        for i, r in enumerate(routes[c.info.name])
    ]
    return list(rows), where


def _answers(
    backbone: Backbone,
    bank: AdapterBank,
    own: EvalSet,
    columns: tuple[str, str],
    routes: Mapping[str, list[Routes]],
    policy: QAPolicy,
    source: str,
    training: Sequence[Example] = (),
    questions: int = 0,
) -> Answers:
    """Every example of ``own`` answered greedily by the two columns, every ``training`` example by the first
    (the subject) through its fixed routes, and the first ``questions`` general questions with known answers by
    the subject and the base (the base's answers once per process), in one batch; each answer may run to the
    target's length in tokens plus ``answer_extra_tokens`` (at most ``answer_max_new_tokens``), a general answer
    to ``FACT_MAX_NEW_TOKENS``."""
    from lorafleet.serving.decode import RowSpec  # torch, on first use

    tokenizer = backbone.tokenizer
    stop = _stop_strings(tokenizer)

    def spec(example: Example, route: Routes) -> RowSpec:
        budget, cap = _target_tokens(tokenizer, example.completion), policy.answer_max_new_tokens
        # a pair: room for its longer side, and for the ends where its two styles differ
        if example.rejected is not None:
            budget = max(budget, _target_tokens(tokenizer, example.rejected))
            cap = max(cap, policy.pair_answer_max_new_tokens)
        return RowSpec(
            prompt_ids=tuple(encode_prompt(tokenizer, example)),
            routes=tuple(route),
            max_new_tokens=max(1, min(cap, budget + policy.answer_extra_tokens)),
            stop=stop,
        )

    subject, reference = columns
    fixed = routes[subject][0] if own.examples else []  # the candidate alone: one route for every example
    specs = [spec(e, routes[c][i]) for c in columns for i, e in enumerate(own.examples)]
    specs += [spec(e, fixed) for e in training]
    facts = fact_prompts(questions)
    place = (backbone.fingerprint.digest, backbone.quantization, str(bank.device))
    base_missing = [p for p in facts if (*place, p) not in _BASE_FACT_ANSWERS]

    def fact_spec(prompt: str, route: Routes) -> RowSpec:
        ids = encode_prompt(tokenizer, Example(0, prompt, "", "sft"))
        return RowSpec(tuple(ids), tuple(route), max_new_tokens=FACT_MAX_NEW_TOKENS, stop=stop)

    n_own = len(specs)
    specs += [fact_spec(p, fixed) for p in facts] + [fact_spec(p, []) for p in base_missing]
    outputs = _decode_greedily(bank, tokenizer, specs)
    fact_outputs, base_outputs = outputs[n_own : n_own + len(facts)], outputs[n_own + len(facts) :]
    for prompt, out in zip(base_missing, base_outputs, strict=True):
        _BASE_FACT_ANSWERS[(*place, prompt)] = out.text
    outputs = outputs[:n_own]
    n = len(own.examples)
    by_column = {c: outputs[k * n : (k + 1) * n] for k, c in enumerate(columns)}
    items = tuple(
        AnswerItem(e.prompt, e.completion, {c: by_column[c][i].text for c in columns}, e.rejected)
        for i, e in enumerate(own.examples)
    )
    trained = outputs[2 * n :]
    nonfinite = {c: sum(1 for o in by_column[c] if o.nonfinite_steps) for c in columns}
    nonfinite[subject] += sum(1 for o in [*trained, *fact_outputs] if o.nonfinite_steps)
    answered = tuple(
        AnswerItem(e.prompt, e.completion, {subject: o.text}) for e, o in zip(training, trained, strict=True)
    )
    general = tuple(
        AnswerItem(p, KNOWN_ANSWERS[p][0], {subject: o.text, BASE: _BASE_FACT_ANSWERS[(*place, p)]})
        for p, o in zip(facts, fact_outputs, strict=True)
    )
    return Answers(own.name, subject, reference, items, nonfinite, source, answered, general)


def _decode_greedily(bank: AdapterBank, tokenizer: object, specs: Sequence[RowSpec]) -> list[RowOutput]:
    """``specs`` decoded in one batch, the model in eval mode (no adapter dropout), its mode restored after."""
    from lorafleet.serving.decode import BatchDecoder  # torch, on first use

    was_training = bank.model.training
    bank.model.eval()
    try:
        return BatchDecoder(bank.model, bank, tokenizer, device=bank.device).run(specs)
    finally:
        bank.model.train(was_training)


def _target_tokens(tokenizer: object, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]


def _stop_strings(tokenizer: object) -> tuple[str, ...]:
    """A chat model ends its turn itself; the plain format's one-line answers end at a newline."""
    return () if has_chat_template(tokenizer) else ("\n",)


def _greedy_samples(
    backbone: Backbone,
    bank: AdapterBank,
    sets: Sequence[EvalSet],
    columns: Sequence[ColumnSpec],
    routes: Mapping[str, Mapping[str, list[Routes]]],
    policy: QAPolicy,
) -> dict[tuple[str, str], tuple[Sample, ...]]:
    """The first ``samples_per_cell`` examples of each set, decoded greedily through each column (one batch)."""
    from lorafleet.serving.decode import RowSpec  # torch, on first use

    k = policy.samples_per_cell
    keys = [(s, c, i) for s in sets for c in columns for i in range(min(k, len(s.examples)))]
    if not keys:
        return {}
    tokenizer = backbone.tokenizer
    stop = _stop_strings(tokenizer)
    specs = [
        RowSpec(
            prompt_ids=tuple(encode_prompt(tokenizer, s.examples[i])),  # rendered as serving renders it
            routes=tuple((slot, weight) for slot, weight in routes[s.name][c.info.name][i]),
            max_new_tokens=policy.sample_max_new_tokens,
            stop=stop,
        )
        for s, c, i in keys
    ]
    distinct = list(dict.fromkeys(specs))  # columns that route a prompt alike decode it once
    decoded = dict(zip(distinct, _decode_greedily(bank, tokenizer, distinct), strict=True))
    outputs = [decoded[spec] for spec in specs]
    samples: dict[tuple[str, str], list[Sample]] = {}
    for (s, c, i), out in zip(keys, outputs, strict=True):
        example = s.examples[i]
        samples.setdefault((s.name, c.info.name), []).append(
            Sample(example.prompt, example.completion, out.text)
        )
    return {key: tuple(found) for key, found in samples.items()}


__all__ = [
    "ColumnSpec",
    "GatedExperts",
    "SlotLoader",
    "embed_sets",
    "evaluate_matrix",
    "gate_routes",
    "gate_traffic",
]
