"""Measurements for ``bench_quality_real.py``: greedy answers judged for facts and leaks, KL to the base, caches.

Kept apart from the protocol so each file stays readable: everything here takes a bank, its slots and the
personal users, and returns plain numbers or answers.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.adapters.prefix import FrozenPrefix
from lorafleet.backbone import Backbone
from lorafleet.routing.embeddings import common_direction, embed_prompts
from lorafleet.routing.experts import Expert, ExpertSet
from lorafleet.routing.gates import GENERAL_MARGIN, CentroidGate
from lorafleet.routing.spec import GateSpec
from lorafleet.training.dataset import Example, collate, encode_example, pad_token_id
from lorafleet.training.general_prompts import (
    chat_prompt_ids,
    general_exemplars,
    generate_answers,
    prompt_set_digest,
)
from lorafleet.training.metrics import scored_logits
from lorafleet.training.personal_facts import (
    KINDS,
    Fact,
    PersonalUser,
    answer_has_fact,
    personal_values_in,
    split_questions,
)

#: the fixed openings (3 words or more) of the personal answers ("Your pet is called", "You live in"): an answer
#: to a general prompt that uses one the base did not is hijacked by the personal format, even without a value
PERSONAL_FRAMES: tuple[str, ...] = tuple(
    sorted({f for k in KINDS for a in k.answers if len((f := a.split("{")[0].strip().lower()).split()) >= 3})
)
#: rows per teacher-forced forward in the KL measure (logits over the 49k vocabulary are the memory cost)
KL_BATCH_ROWS = 16


@dataclass(frozen=True)
class Row:
    """One prompt to answer: whose adapter (``slot`` None = the base), and the fact it asks about, if any.
    ``routes`` ((slot, weight), ...), when set, is a mixture of slots that replaces ``slot`` (empty: the base)."""

    prompt: str
    slot: int | None
    user: str = ""
    fact: Fact | None = None
    routes: tuple[tuple[int, float], ...] | None = None

    def plan(self) -> list[tuple[int, float]]:
        """The slots and weights the row is answered through (empty: the base)."""
        if self.routes is not None:
            return list(self.routes)
        return [] if self.slot is None else [(self.slot, 1.0)]


@dataclass
class Judged:
    """Answers of one adapter set (an arm, or the base) judged: per-user personal hits and leaks, general leaks."""

    personal: dict[str, list[tuple[int, bool]]] = field(default_factory=dict)  # user -> (round, stated)
    cross_leaks: dict[str, list[bool]] = field(default_factory=dict)
    general_leaks: dict[str, list[bool]] = field(default_factory=dict)
    general_framed: dict[str, list[bool]] = field(default_factory=dict)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (user, prompt, answer)
    flagged: list[tuple[str, str, str]] = field(default_factory=list)  # answers that leak or are framed
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # personal answers that miss the fact

    def accuracy(self, rounds: Sequence[int] | None = None) -> float:
        """Median over users of the share of their personal answers (about ``rounds``) that state the fact."""
        return _median_share(
            {u: [hit for r, hit in v if rounds is None or r in rounds] for u, v in self.personal.items()}
        )

    def cross_leak_rate(self) -> float:
        return _median_share(self.cross_leaks)

    def general_clean(self) -> float:
        """Median over users of the share of general answers with no personal value the base did not say."""
        return 1.0 - _median_share(self.general_leaks) if self.general_leaks else math.nan

    def general_unframed(self) -> float:
        """Median over users of the share of general answers with neither a new value nor a new personal frame."""
        return 1.0 - _median_share(self.general_framed) if self.general_framed else math.nan


def _median_share(values: dict[str, list[bool]]) -> float:
    shares = [sum(v) / len(v) for v in values.values() if v]
    return statistics.median(shares) if shares else math.nan


def dequantize_once(model: nn.Module) -> int:
    """Replace every bitsandbytes 4-bit linear layer by an fp32 ``nn.Linear`` holding its dequantised weight.

    The numbers are the nf4 model's (bitsandbytes on CPU dequantises to fp32 and multiplies, on every forward;
    the benchmark checks the logits match), the speed that of fp32: on this CPU a forward then skips about
    0.5-6 s of dequantising (load-dependent), which would otherwise dominate every decoding step. Returns the
    count replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)  # type: ignore[attr-defined]
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.data.to(torch.float32), requires_grad=False)
            linear.eval()
            setattr(module, name, linear)
            replaced += 1
    return replaced


def probe_logits(backbone: Backbone) -> torch.Tensor:
    """Logits of one fixed chat prompt (to check that dequantising once leaves the numbers unchanged)."""
    ids = torch.tensor([chat_prompt_ids(backbone.tokenizer, "What is the capital of France?")])
    with torch.no_grad():
        return backbone.model(input_ids=ids).logits.float()  # [1, seq, vocab]


def cached_answers(
    cache_dir: Path, backbone: Backbone, prompts: Sequence[str], max_new_tokens: int, *, trim: bool
) -> list[str]:
    """The base's greedy answers to ``prompts``, from a JSON file under ``cache_dir`` when a run made them."""
    name = (
        f"{backbone.fingerprint.digest[:16]}-{backbone.quantization}-"
        f"{prompt_set_digest(prompts)[:16]}-{max_new_tokens}-{'trim' if trim else 'raw'}.json"
    )
    path = cache_dir / name
    if path.is_file():
        answers = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(answers, list) and len(answers) == len(prompts):
            return [str(a) for a in answers]
    answers = generate_answers(backbone.model, backbone.tokenizer, prompts, max_new_tokens, trim=trim)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(answers, indent=0), encoding="utf-8")
    tmp.replace(path)
    return answers


def personal_rows(
    users: Sequence[PersonalUser], slots: Mapping[str, int | None], rounds: Sequence[int], seed: int
) -> list[Row]:
    """Every unseen paraphrase about each user's facts of ``rounds``, through the user's slot."""
    rows = []
    for user in users:
        for fact in user.facts_of(rounds):
            for question in split_questions(fact.kind, seed=seed)[1]:
                rows.append(Row(question, slots[user.key], user.key, fact))
    return rows


def general_rows(
    users: Sequence[PersonalUser], slots: Mapping[str, int | None], prompts: Sequence[str]
) -> list[Row]:
    """Every general eval prompt through each user's slot."""
    return [Row(p, slots[u.key], u.key) for u in users for p in prompts]


def answer_rows(backbone: Backbone, bank: AdapterBank, rows: Sequence[Row], max_new_tokens: int) -> list[str]:
    """Greedy answers of every row in shared batches (each row through its own slot), untrimmed.

    Each distinct (prompt, slot) is decoded once: greedy answers depend on nothing else, so arms that share rows
    (the gated arms at several margins and the adapter arm they route) cost only their differences."""

    def key(row: Row) -> tuple[str, tuple[tuple[int, float], ...]]:
        return row.prompt, tuple(row.plan())

    distinct = list(dict.fromkeys(key(r) for r in rows))
    answers = generate_answers(
        backbone.model,
        backbone.tokenizer,
        [prompt for prompt, _ in distinct],
        max_new_tokens,
        batch_size=256,
        bank=bank,
        routes=[list(plan) for _, plan in distinct],
        trim=False,
    )
    found = dict(zip(distinct, answers, strict=True))
    return [found[key(r)] for r in rows]


def judge(
    rows: Sequence[Row],
    answers: Sequence[str],
    users: Sequence[PersonalUser],
    base_general: dict[str, str],
) -> Judged:
    """Personal rows: fact stated, other users' values present; general rows: a value the base did not say."""
    out = Judged()
    for row, answer in zip(rows, answers, strict=True):
        found = personal_values_in(answer, users)
        if row.fact is not None:
            stated = answer_has_fact(answer, row.fact)
            out.personal.setdefault(row.user, []).append((row.fact.round, stated))
            if not stated:
                out.misses.append((row.user, row.prompt, answer))
            crossed = any(key != row.user for key in found)
            out.cross_leaks.setdefault(row.user, []).append(crossed)
            if crossed:
                out.flagged.append((row.user, row.prompt, answer))
        else:
            base_found = personal_values_in(base_general.get(row.prompt, ""), users)
            new = {(k, kind) for k, kinds in found.items() for kind in kinds} - {
                (k, kind) for k, kinds in base_found.items() for kind in kinds
            }
            out.general_leaks.setdefault(row.user, []).append(bool(new))
            base_frames = frames_in(base_general.get(row.prompt, ""))
            framed = bool(new) or bool(frames_in(answer) - base_frames)
            out.general_framed.setdefault(row.user, []).append(framed)
            if framed:
                out.flagged.append((row.user, row.prompt, answer))
        out.samples.append((row.user, row.prompt, answer))
    return out


def frames_in(answer: str) -> set[str]:
    """The personal-answer openings (``PERSONAL_FRAMES``) that ``answer`` contains, case-insensitively."""
    text = answer.lower()
    return {frame for frame in PERSONAL_FRAMES if frame in text}


@torch.no_grad()
def kl_to_base(
    bank: AdapterBank,
    tokenizer: Any,
    examples: Sequence[Example],
    slots: Sequence[int],
    prefix: FrozenPrefix | None,
    layer: int,
) -> dict[int, tuple[float, float]]:
    """Per slot: mean per-token KL(base || adapter) and mean NLL increase, teacher-forced on ``examples``
    (the base's own answers to the eval prompts), over the completion tokens and the end of turn."""
    model = bank.model
    was_training = model.training
    model.eval()
    sums = {s: [0.0, 0.0] for s in slots}
    tokens = 0
    try:
        for start in range(0, len(examples), KL_BATCH_ROWS):
            chunk = examples[start : start + KL_BATCH_ROWS]
            encoded = [encode_example(tokenizer, e, max_seq_len=256) for e in chunk]
            batch = collate(encoded, pad_id=pad_token_id(tokenizer)).to(bank.device)
            sequences = [ids for ids, _ in encoded]
            with bank.base_only():
                base, scored = scored_logits(model, batch, prefix=prefix, layer=layer, sequences=sequences)
            base_logp = torch.log_softmax(base, dim=-1)  # [n, vocab]
            base_p = base_logp.exp()
            labels = scored.labels.unsqueeze(1)  # [n, 1]
            tokens += int(labels.shape[0])
            for slot in slots:
                with bank.use(SlotPlan.single([slot] * len(chunk))):
                    logits, _ = scored_logits(model, batch, prefix=prefix, layer=layer, sequences=sequences)
                logp = torch.log_softmax(logits, dim=-1)  # [n, vocab]
                sums[slot][0] += float((base_p * (base_logp - logp)).sum())
                sums[slot][1] += float((base_logp.gather(1, labels) - logp.gather(1, labels)).sum())
    finally:
        model.train(was_training)
    return {s: (kl / max(1, tokens), dnll / max(1, tokens)) for s, (kl, dnll) in sums.items()}


def gated_rows(
    backbone: Backbone,
    bank: AdapterBank,
    rows: Sequence[Row],
    keys: Mapping[str, Sequence[float]],
    *,
    margin: float | None = None,
    claims: Mapping[str, Sequence[float]] | None = None,
) -> list[Row]:
    """``rows`` as serving routes them: each user's experts holds its one adapter (routing key ``keys[user]``), and
    the centroid gate with the backbone's general key sends a prompt nearer the general prompts to the base
    (``slot`` None). The gate is the production one (``routing.gates.CentroidGate``), at its default margin
    unless ``margin`` is given; with ``claims`` (the adapters' routing claims, by user) the base answers what the
    adapter does not claim, as it does for versions that store one."""
    gate = CentroidGate(
        general=general_exemplars(backbone, bank), general_margin=GENERAL_MARGIN if margin is None else margin
    )
    embeddings = embed_prompts(backbone, bank, [r.prompt for r in rows])  # [rows, hidden]
    out = []
    for i, row in enumerate(rows):
        claim = None if claims is None else tuple(claims[row.user])
        member = Expert(1, row.user, "personal", 1, 1, "x", 0, 8, tuple(keys[row.user]), claim)
        bank = ExpertSet(1, 1, row.user, (member,), GateSpec(), f"bench/{row.user}")
        (decision,) = gate.decide(bank, embeddings[i : i + 1])
        out.append(Row(row.prompt, row.slot if decision.routes else None, row.user, row.fact))
    return out


def mixture_rows(
    backbone: Backbone,
    bank: AdapterBank,
    rows: Sequence[Row],
    experts: Mapping[str, Sequence[tuple[int, Sequence[float]]]],
) -> list[Row]:
    """``rows`` routed over each user's several adapters (``experts[user]``: (slot, routing key) per adapter) by
    the production centroid gate as serving builds it without the base's side (top 2, softmax at the default
    temperature, the common direction of the general prompts left out): each row gets the gate's mixture."""
    exemplars = general_exemplars(backbone, bank)
    gate = CentroidGate(common=common_direction(exemplars))
    embeddings = embed_prompts(backbone, bank, [r.prompt for r in rows])  # [rows, hidden]
    out = []
    for i, row in enumerate(rows):
        owned = experts[row.user]
        members = tuple(
            Expert(j + 1, f"round-{j + 1}", "personal", j + 1, 1, "x", 0, 8, tuple(key))
            for j, (_, key) in enumerate(owned)
        )
        user_bank = ExpertSet(1, 1, row.user, members, GateSpec(), f"bench/{row.user}/{len(owned)}")
        (decision,) = gate.decide(user_bank, embeddings[i : i + 1])
        routes = tuple((owned[m][0], w) for m, w in decision.routes)
        out.append(Row(row.prompt, None, row.user, row.fact, routes=routes))
    return out
