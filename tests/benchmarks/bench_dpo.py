"""Preference learning (DPO) on the real backbone (SmolLM2-135M-Instruct, nf4): users with opposite preferences.

Protocol (one seed; ``--seed`` picks another training seed):

- The base's own greedy answers to the general anchor prompts (``ANCHOR_PROMPTS``) are the content; each user's
  preference is a style over that content, and opposite users get mirrored pairs (chosen and rejected swapped):
  ``concise`` (the first sentence) against ``detailed`` (the whole answer), ``formal`` against ``casual``
  (register words around the answer), ``signoff`` (a closing line) against ``plain``.
- Only answers of two sentences or more are used, in a seeded order; each user trains on ``--train-pairs``
  pairs and ``--held-out-pairs`` other prompts' pairs are held out. All users train in
  one ``train_slots`` job (DPO, reference = the base, since every adapter is new), rank 8 on the top 6 layers with
  the frozen-prefix cache. By default DPO with the SFT term on the chosen answers (``TrainingConfig.sft_on_chosen``,
  on by default; ``--no-sft-on-chosen``: DPO alone) and no anchors; ``--anchors N`` gives every user N anchor rows:
  the base's own answers to anchor prompts that no pair uses (neither trained nor held out), ``--batch-size`` of them
  per step.
- Ratings (``--ratings``): two more users get the sign-off preference as ratings (the sign-off answer rated 0.9,
  the plain one 0.1, per prompt). ``signoff-ratings-dpo`` is built by the dataset rules with DPO on (the two
  ratings of a prompt become a pair); ``signoff-ratings-sft`` with DPO off (the high rating trains SFT, the low one
  is dropped: the rule before preference learning). They train in the same job.

Measured:

- held-out preference accuracy: share of held-out pairs whose implicit reward margin (against the base) is > 0,
  after training (the base itself scores 50 % by that measure: every margin is 0), and the share the base already
  ranks right by raw log-probability;
- the judge (length for concise/detailed, register words for formal/casual, the closing line for signoff/plain)
  on greedy answers to ``--judge-prompts`` never-trained general prompts (the first of ``EVAL_PROMPTS``: capitals
  and arithmetic), each user against the base; and the same judge on as many prompts spread over
  ``EVAL_PROMPTS``' seven categories (QA's probe order: capitals, arithmetic, facts, how-to, ...), where a longer
  answer has something to say (``--judge-prompts 63``: both sets are all 63; ``--judge-tokens`` long enough for
  answers to end, or a sign-off cannot show); each judge's validity on the user's own held-out pairs (it accepts
  the chosen answer and rejects the rejected one), and for concise/detailed the sentence judge (the answer stops
  after its first sentence, or goes on: the preference as the pairs state it) on the seven categories' prompts;
- retention: the share of the base's own greedy answer tokens to ``EVAL_PROMPTS`` that the adapter still
  predicts (teacher-forced top-1), relative to the base's share; beside it, two diagnostics: the same on the
  answers' body (the first token and the end-of-turn left out), and "facts kept": of the 30 general questions with
  known answers (capitals, arithmetic, facts: QA's ``lorafleet.qa.facts.KNOWN_ANSWERS``) that the base answers right
  greedily, the share the adapter's greedy answer still answers right; QA's probe drift (the probe set's loss
  through the adapter minus the base's; QA's probe rule rejects a candidate at 0.25 nats or more on a pretrained
  backbone) on the whole answers and on their body (what QA reads for a candidate trained on pairs); and QA's
  looping-answers figure (the share of the adapter's greedy answers that loop, ``lorafleet.qa.answers.loops``,
  minus the base's; QA's bound is +10 %); and token retention split by how far the base's greedy token leads its
  runner-up (``retention_by_margin``: where the base was all but undecided, any change flips its choice), with
  the share of the base's tokens the adapter misses and the share where it would end the answer instead;
  with ``--sampled-facts K``, K answers sampled per known-answer question (``--sample-temperature``, the same
  seeds for every route) and the share that say a right answer, the adapter's relative to the base's: general
  knowledge measured on the model's distribution, not on its coin flips;
- general knowledge as multiple choice (``general_choices.py``, on unless ``--no-choices``): 120 never-trained
  questions, each with a right option and three wrong ones completing the same answer stem, scored by likelihood
  as lm-evaluation-harness scores ARC or MMLU; each adapter's accuracy relative to the base's, the items it lost
  and gained, and the exact McNemar p-value that it is worse than the base;
- the time of a DPO step against an SFT step on the same rows (the pairs' two sides as SFT rows), same users,
  interleaved, median over ``--timing-steps``.

Experiments: ``--scales`` evaluates each adapter again with its weight change scaled (B times the scale);
``--save-adapters`` / ``--load-adapters`` keep the trained adapters, so another evaluation needs no training;
``--dpo-weight 0`` trains the chosen answers as SFT only; ``--rank`` and ``--adam-eps`` change the adapter's rank
(alpha twice it) and AdamW's eps; ``--pair-anchors`` makes the training pairs' content anchors too.

Run from the repository root (the small setting, about 10-15 minutes on 2 shared cores):

    nice -n 19 .venv/bin/python tests/benchmarks/bench_dpo.py --data-dir /tmp/lf-data
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import add_int_options  # noqa: E402
from general_choices import choice_figures, choice_scores, chosen_right  # noqa: E402
from quality_real_eval import cached_answers, dequantize_once, probe_logits  # noqa: E402

from lorafleet.adapters import AdapterBank, SlotPlan, inject_bank  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.backbone import Backbone, load_backbone  # noqa: E402
from lorafleet.domain import FeedbackRecord  # noqa: E402
from lorafleet.feedback import prepare_record  # noqa: E402
from lorafleet.qa.answers import loops, signed_rank_p  # noqa: E402
from lorafleet.qa.evalsets import EvalSet, probe_set  # noqa: E402
from lorafleet.qa.facts import FACT_MAX_NEW_TOKENS, facts_kept, says_answer  # noqa: E402
from lorafleet.qa.facts import fact_prompts as all_fact_prompts  # noqa: E402
from lorafleet.qa.matrix import ColumnSpec, evaluate_matrix  # noqa: E402
from lorafleet.qa.policy import QAPolicy  # noqa: E402
from lorafleet.qa.probe import probe_examples, probe_prompts  # noqa: E402
from lorafleet.qa.results import BASE, CANDIDATE, ColumnInfo  # noqa: E402
from lorafleet.qa.rules import candidate_rules  # noqa: E402
from lorafleet.serving.decode import BatchDecoder, RowSpec  # noqa: E402
from lorafleet.training import preference  # noqa: E402
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS, TrainingConfig  # noqa: E402
from lorafleet.training.dataset import Example, build_dataset, encode_example, pad_token_id  # noqa: E402
from lorafleet.training.general_prompts import (  # noqa: E402
    ANCHOR_PROMPTS,
    EVAL_PROMPTS,
    chat_prompt_ids,
    generate_answers,
)
from lorafleet.training.metrics import Route, evaluate  # noqa: E402
from lorafleet.training.preference import (  # noqa: E402
    DpoTerms,
    dpo_terms,
    pair_logps,
    pair_sides,
    preference_accuracy,
)
from lorafleet.training.trainer import EvalResult, SlotTraining, train_slots  # noqa: E402

logger = logging.getLogger("bench_dpo")
SIGNOFF = "Best wishes,\nSam"
FORMAL_WORDS = ("certainly", "trust")
CASUAL_WORDS = ("hey", "cool")


def first_sentence(text: str) -> str:
    ends = [i for i in (text.find(". "), text.find("! "), text.find("? ")) if i > 0]
    return text[: min(ends) + 1] if ends else text


STYLES: dict[str, Callable[[str], str]] = {
    "concise": first_sentence,
    "detailed": lambda a: a,
    "formal": lambda a: f"Certainly. {a} I trust this is helpful.",
    "casual": lambda a: f"Hey! {a} Cool, right?",
    "signoff": lambda a: f"{a}\n\n{SIGNOFF}",
    "plain": lambda a: a,
}
OPPOSITE = {"concise": "detailed", "formal": "casual", "signoff": "plain"}
OPPOSITE.update({v: k for k, v in OPPOSITE.items()})


def _has(text: str, words: Sequence[str]) -> bool:
    lowered = text.lower()
    return any(w in lowered for w in words)


#: whether an answer shows the style (the benchmark's judge)
JUDGES: dict[str, Callable[[str], bool]] = {
    "concise": lambda a: len(a.split()) <= 25,
    "detailed": lambda a: len(a.split()) >= 35,
    "formal": lambda a: _has(a, FORMAL_WORDS) and not _has(a, CASUAL_WORDS),
    "casual": lambda a: _has(a, CASUAL_WORDS) and not _has(a, FORMAL_WORDS),
    "signoff": lambda a: "Best wishes" in a,
    "plain": lambda a: "Best wishes" not in a,
}


#: the concise/detailed preference as the pairs state it (the first sentence against the whole answer): an answer
#: that stops after its first sentence, or one that goes on; ``JUDGES``' word counts reject a fifth of the detailed
#: user's own chosen answers (``judge_validity``)
SENTENCE_JUDGES: dict[str, Callable[[str], bool]] = {
    "concise": lambda a: first_sentence(a.strip()) == a.strip(),
    "detailed": lambda a: first_sentence(a.strip()) != a.strip(),
}


def judge_validity(judge: Callable[[str], bool], pairs: Sequence[Example]) -> float:
    """The share of ``pairs`` whose chosen answer the judge accepts and whose rejected one it does not: how far the
    judge agrees with the user's own stated preference (1.0: on every pair)."""
    return sum(judge(p.completion) and not judge(p.rejected or "") for p in pairs) / max(len(pairs), 1)


def pairs_for(style: str, prompts: Sequence[str], answers: Sequence[str], first_id: int) -> list[Example]:
    chosen, rejected = STYLES[style], STYLES[OPPOSITE[style]]
    return [
        Example(first_id + i, p, chosen(a), "preference", rejected(a))
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]


def rating_records(prompts: Sequence[str], answers: Sequence[str], first_id: int) -> list[FeedbackRecord]:
    """The sign-off preference as ratings: the sign-off answer rated 0.9, the plain one 0.1."""
    records = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        for j, (response, score) in enumerate(((STYLES["signoff"](a), 0.9), (a, 0.1))):
            prepared = prepare_record(
                {"kind": "rating", "prompt": p, "response": response, "score": score}, index=0
            )
            records.append(
                FeedbackRecord(
                    first_id + 2 * i + j,
                    1,
                    prepared.kind,
                    prepared.payload,
                    prepared.content_hash,
                    datetime.now(UTC),
                )
            )
    return records


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path(".lorafleet"))
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--train-pairs", type=int, default=24)
    parser.add_argument(
        "--styles", nargs="+", choices=list(STYLES), default=list(STYLES), help="users, by style"
    )
    parser.add_argument("--held-out-pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--lr-ratio-b",
        type=float,
        default=TrainingConfig().lr_ratio_b,
        help="LoRA+: the B matrices learn at --lr times this (TrainingConfig.lr_ratio_b; the services use "
        f"{SERVICE_TRAINING_DEFAULTS.get('lr_ratio_b', TrainingConfig().lr_ratio_b)})",
    )
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="LoRA dropout (the library's default: 0.05)"
    )
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--dpo-weight", type=float, default=1.0, help="0: the chosen answers as SFT only")
    parser.add_argument(
        "--adam-eps", type=float, default=None, help="an experiment: AdamW's eps (torch: 1e-8)"
    )
    parser.add_argument(
        "--margin-cap",
        type=float,
        default=None,
        help="an experiment: a pair's DPO loss stops at this reward margin (beta times the log-ratio "
        "difference), so a fitted pair pushes no further; the library has no such option",
    )
    parser.add_argument(
        "--sft-on-chosen",
        action=argparse.BooleanOptionalAction,
        default=TrainingConfig().sft_on_chosen,
        help="the chosen answers also train as SFT beside DPO (TrainingConfig.sft_on_chosen; default: its default)",
    )
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument(
        "--anchors",
        type=int,
        default=0,
        help="anchor rows per user: the base's answers to anchor prompts that no pair uses",
    )
    parser.add_argument(
        "--pair-anchors",
        action="store_true",
        help="an experiment: the training pairs' content (the base's own answers) are anchors too, so with "
        "--anchor-distill the adapter is held to the base's distribution on the pairs' own prompts",
    )
    parser.add_argument(
        "--anchor-free-ends",
        choices=["none", "closing", "both", "auto"],
        default=TrainingConfig().anchor_free_ends,
        help="which ends of the anchors' answers carry no loss (TrainingConfig.anchor_free_ends)",
    )
    parser.add_argument(
        "--anchor-distill",
        type=float,
        default=TrainingConfig().anchor_distill,
        help="KL(base || adapter) on the anchors' answer positions (TrainingConfig.anchor_distill)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="SFT rows per user per step")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--rank", type=int, default=8, help="LoRA rank (alpha twice the rank, as the library's 8 / 16)"
    )
    parser.add_argument("--answer-tokens", type=int, default=64, help="max new tokens of the base's answers")
    add_int_options(parser, judge_prompts=12, judge_tokens=64, retention_prompts=24, timing_steps=4)
    parser.add_argument("--no-ratings", dest="ratings", action="store_false")
    parser.add_argument(
        "--qa",
        action="store_true",
        help="also run QA's matrix and rules on each adapter (its held-out pairs as the holdout; default policy)",
    )
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="an experiment: evaluate each trained adapter with its weight change scaled by each of these "
        "(B times the scale: 0.5 is the weights halfway between the base and the trained adapter)",
    )
    parser.add_argument(
        "--sampled-facts",
        type=int,
        default=0,
        help="answers sampled per general question with a known answer, per adapter and for the base (0: off)",
    )
    parser.add_argument("--sample-temperature", type=float, default=0.7)
    parser.add_argument(
        "--no-choices",
        dest="choices",
        action="store_false",
        help="skip the multiple-choice general-knowledge measure (general_choices.py)",
    )
    parser.add_argument(
        "--save-adapters",
        type=Path,
        default=None,
        help="save the trained adapters (and metrics) to this file",
    )
    parser.add_argument(
        "--load-adapters",
        type=Path,
        default=None,
        help="evaluate the adapters a run with the same arguments saved (--save-adapters) instead of training",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the training seed (the adapters' initialisation, sampling and dropout); the pairs stay the same",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def load(args: argparse.Namespace) -> Backbone:
    backbone = load_backbone(
        args.backbone, quantization=args.quantization, device="cpu", data_dir=args.data_dir
    )
    if backbone.quantization == "nf4":
        before = probe_logits(backbone)
        dequantize_once(backbone.model)
        diff = float((probe_logits(backbone) - before).abs().max())
        if diff > 1e-4:
            raise SystemExit(f"dequantising once changed the logits by {diff}")
    return backbone


#: the bins of ``retention_by_margin``: how far (nats) the base's greedy token leads its runner-up
MARGIN_BINS = (0.0, 0.5, 1.0, 2.0, float("inf"))


def teacher_forced(
    bank: AdapterBank, tokenizer: object, examples: Sequence[Example], slot: int | None
) -> list[tuple[list[int], torch.Tensor]]:
    """Per example, its answer's token ids (the end of turn included) and the log-probs ``[answer, vocab]`` that
    predicted each of them (teacher-forced), through the slot (None: the base)."""
    out = []
    bank.model.eval()
    for example in examples:
        ids, n = encode_example(tokenizer, example, max_seq_len=192)
        with torch.no_grad(), bank.use(None if slot is None else SlotPlan.single([slot])):
            logits = bank.model(input_ids=torch.tensor([ids])).logits[0]  # [seq, vocab]
        out.append((ids[len(ids) - n :], logits[len(ids) - n - 1 : len(ids) - 1].log_softmax(-1)))
    return out


def forced_accuracy(forced: list[tuple[list[int], torch.Tensor]], *, body: bool = False) -> float:
    """Teacher-forced top-1 accuracy over ``teacher_forced``'s output: every answer token (the end of turn
    included), or with ``body`` every one but the first and the end of turn, where a style that opens or closes
    differently (a greeting, a sign-off) must differ from the base (a diagnostic, not the issue's measure)."""
    hits = [
        int(lp[t].argmax()) == ids[t]
        for ids, lp in forced
        for t in (range(1, len(ids) - 1) if body else range(len(ids)))
    ]
    return sum(hits) / max(len(hits), 1)


def retention_by_margin(
    base: list[tuple[list[int], torch.Tensor]], adapter: list[tuple[list[int], torch.Tensor]]
) -> dict[str, float]:
    """Token retention split by how sure the base is of each of its own greedy tokens: for each bin of the base's
    lead of that token over its runner-up (log-prob difference, ``MARGIN_BINS``), the bin's share of the tokens
    (``share_*``) and the share of them the adapter still predicts top-1 (``kept_*``). A diagnostic: it shows
    whether the tokens an adapter changes are ones the base itself was all but undecided on."""
    hits: list[list[int]] = [[] for _ in MARGIN_BINS[1:]]
    end_id = base[0][0][-1]  # the end of turn: every answer's last id
    misses = ending = 0  # ending: misses where the adapter's top-1 is the end of turn (it would stop there)
    for (ids, base_lp), (_, adapter_lp) in zip(base, adapter, strict=True):
        top2 = base_lp.topk(2, dim=-1).values  # [answer, 2]
        for t, token in enumerate(ids):
            if int(base_lp[t].argmax()) != token:  # not the base's greedy token (a trimmed or padded answer)
                continue
            lead = float(top2[t, 0] - top2[t, 1])
            b = next(i for i, high in enumerate(MARGIN_BINS[1:]) if lead < high)
            predicted = int(adapter_lp[t].argmax())
            hits[b].append(int(predicted == token))
            misses += predicted != token
            ending += predicted != token and predicted == end_id
    total = sum(len(h) for h in hits)
    out: dict[str, float] = {"misses": misses / max(total, 1), "misses_ending": ending / max(total, 1)}
    for (low, high), h in zip(itertools.pairwise(MARGIN_BINS), hits, strict=True):
        out[f"share_{low:g}-{high:g}"] = len(h) / max(total, 1)
        out[f"kept_{low:g}-{high:g}"] = sum(h) / max(len(h), 1)
    return out


def sampled_facts(
    backbone: Backbone,
    bank: AdapterBank,
    routes: Sequence[Route],
    samples: int,
    temperature: float,
) -> list[list[float]]:
    """Per route, per general question with a known answer (``fact_prompts`` order), the share of ``samples``
    answers sampled at ``temperature`` (up to QA's 48 new tokens) that say a right answer (``says_answer``). Every
    route draws with the same seeds (common random numbers: where an adapter leaves a question's next-token
    distribution as the base had it, it samples the same answer), so routes differ less by chance than apart."""
    tokenizer = backbone.tokenizer
    prompts = all_fact_prompts()
    decoder = BatchDecoder(backbone.model, bank, tokenizer, device=torch.device("cpu"))
    specs = [
        RowSpec(
            tuple(chat_prompt_ids(tokenizer, p)), tuple(route), FACT_MAX_NEW_TOKENS, temperature, seed=seed
        )
        for route in routes
        for p in prompts
        for seed in range(samples)
    ]
    asked = [p for _ in routes for p in prompts for _ in range(samples)]  # each spec's question
    right: list[bool] = []
    for start in range(0, len(specs), 64):
        outputs = decoder.run(specs[start : start + 64])
        right += [says_answer(p, o.text) for p, o in zip(asked[start : start + 64], outputs, strict=True)]
    per_question = [sum(right[i : i + samples]) / samples for i in range(0, len(right), samples)]
    return [per_question[r * len(prompts) : (r + 1) * len(prompts)] for r in range(len(routes))]


def probe_drifts(adapter: EvalResult, base: EvalResult) -> dict[str, float]:
    """QA's probe drift (the probe set's loss through the adapter minus the base's), on the whole answers and on
    their body (the first token and the end of turn left out: what QA reads for a candidate trained on pairs)."""
    return {"probe_drift": adapter.loss - base.loss, "probe_drift_body": adapter.body_loss - base.body_loss}


def qa_decisions(
    backbone: Backbone,
    bank: AdapterBank,
    held: dict[str, list[Example]],
    slots: dict[str, int],
    beta: float,
    prefix: FrozenPrefix | None,
) -> dict[str, list[str]]:
    """QA's own matrix and candidate rules for each adapter as a first version (no live one: against the base),
    at the default ``QAPolicy`` on a pretrained backbone: its held-out pairs as the holdout, the probe set, the
    answers and the preference pairs. Each user's failed rules' details (empty: QA would promote it)."""
    policy = QAPolicy(samples_per_cell=0)
    probe = probe_set(policy, backbone, bank)
    columns = [
        ColumnSpec(ColumnInfo(BASE, "base")),
        ColumnSpec(ColumnInfo(CANDIDATE, "candidate"), routes=((CANDIDATE, 1.0),)),
    ]
    failed: dict[str, list[str]] = {}
    for user, pairs in held.items():
        own = EvalSet(f"holdout:{user}", "user-holdout", tuple(pairs), len(pairs), own=True)
        matrix = evaluate_matrix(
            backbone=backbone,
            bank=bank,
            sets=[own, probe],
            columns=columns,
            slots={CANDIDATE: slots[user]},
            policy=policy,
            prefix=prefix,
            answers=(CANDIDATE, BASE),
            preference_beta=beta,
        )
        outcomes = candidate_rules(matrix, policy)
        failed[user] = [o.detail for o in outcomes if not o.passed]
        logger.info("QA on %s: %s", user, "; ".join(o.detail for o in outcomes))
    return failed


def step_times(
    bank: AdapterBank,
    backbone: Backbone,
    tasks: list[SlotTraining],
    config: TrainingConfig,
    prefix: FrozenPrefix | None,
) -> list[float]:
    """Seconds of each step after the first (the progress callback runs after every step)."""
    stamps: list[float] = []
    train_slots(
        bank,
        backbone.tokenizer,
        tasks,
        config,
        prefix=prefix,
        progress=lambda *_: stamps.append(time.perf_counter()),
        progress_every=1,
    )
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def scale_adapters(bank: AdapterBank, trained: dict[int, dict[str, torch.Tensor]], scale: float) -> None:
    """The ``--scales`` experiment: each slot's B matrices set to ``scale`` times their trained values (the
    adapter's weight change scaled: the weights ``scale`` of the way from the base to the trained adapter)."""
    for slot, tensors in trained.items():
        info = bank.slot_info(slot)
        assert info is not None
        scaled = {k: v * scale if k.endswith("lora_B.weight") else v for k, v in tensors.items()}
        bank.load_slot(slot, scaled, info.config, replace=True)


def cap_margins(cap: float) -> None:
    """The ``--margin-cap`` experiment: training's DPO loss of a pair is ``-log sigmoid(min(margin, cap))``, so
    no gradient flows from a pair whose margin passed ``cap`` (the margins reported stay the real ones)."""
    real = preference.dpo_terms

    def capped(*logps: torch.Tensor, beta: float) -> DpoTerms:
        terms = real(*logps, beta=beta)
        losses = -torch.nn.functional.logsigmoid(terms.margins.clamp(max=cap))  # [pairs]
        return DpoTerms(losses, terms.chosen_rewards, terms.rejected_rewards)

    preference.dpo_terms = capped  # batch_dpo looks the name up at each call


def main() -> None:
    args = parse_args()
    if args.margin_cap is not None:
        cap_margins(args.margin_cap)
    if args.adam_eps is not None:
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, eps=args.adam_eps)  # the trainer's optimizer
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    backbone = load(args)
    tokenizer = backbone.tokenizer
    cache = args.data_dir / "bench-dpo"
    answers = cached_answers(cache, backbone, ANCHOR_PROMPTS, args.answer_tokens, trim=True)
    # answers of two sentences or more (else concise and detailed would be the same answer), in a seeded order
    all_answers = answers
    kept = [(p, a) for p, a in zip(ANCHOR_PROMPTS, answers, strict=True) if a and first_sentence(a) != a]
    random.Random(0).shuffle(kept)
    prompts, answers = [p for p, _ in kept], [a for _, a in kept]
    unused = [(p, a) for p, a in zip(ANCHOR_PROMPTS, all_answers, strict=True) if a and p not in prompts]
    n = min(args.train_pairs, len(prompts) - 4)
    end = n + args.held_out_pairs
    train_p, train_a, held_p, held_a = prompts[:n], answers[:n], prompts[n:end], answers[n:end]
    # anchors: the base's own answers to anchor prompts no pair uses (neither trained nor held out)
    unused += [(p, a) for p, a in zip(prompts[end:], answers[end:], strict=True)]
    random.Random(1).shuffle(unused)
    anchors = [Example(20_000 + i, p, a, "sft") for i, (p, a) in enumerate(unused[: args.anchors])]
    retention_prompts = list(EVAL_PROMPTS[: args.retention_prompts])
    base_general = cached_answers(
        cache, backbone, retention_prompts, 48, trim=False
    )  # before the bank exists
    logger.info("base answers ready (%d prompts: %d train, %d held out)", len(prompts), n, len(held_p))

    users = list(args.styles)
    train = {u: pairs_for(u, train_p, train_a, 1) for u in users}
    held = {u: pairs_for(u, held_p, held_a, 10_000) for u in users}
    config = TrainingConfig(
        rank=args.rank,
        alpha=2 * args.rank,
        dropout=args.dropout,
        layers=f"top {args.layers}",
        learning_rate=args.lr,
        lr_ratio_b=args.lr_ratio_b,
        max_steps=args.steps,
        batch_size=args.batch_size,
        pairs_per_step=args.pairs_per_step,
        max_seq_len=192,
        anchor_ratio=0.0,
        holdout_fraction=0.0,
        dpo_weight=args.dpo_weight,
        dpo_beta=args.beta,
        sft_weight=args.sft_weight,
        sft_on_chosen=args.sft_on_chosen,
        anchor_free_ends=args.anchor_free_ends,
        anchor_distill=args.anchor_distill,
        seed=args.seed,
    )
    if args.ratings and "signoff" in users:
        ratings = rating_records(train_p, train_a, 1)
        train["signoff-ratings-dpo"] = list(build_dataset(ratings, config=config).train)
        train["signoff-ratings-sft"] = list(
            build_dataset(ratings, config=config.with_changes(dpo_weight=0.0)).train
        )
        held["signoff-ratings-dpo"] = held["signoff-ratings-sft"] = held["signoff"]
        users += ["signoff-ratings-dpo", "signoff-ratings-sft"]
    num_layers = int(backbone.model.config.num_hidden_layers)
    top = "|".join(str(i) for i in range(num_layers - args.layers, num_layers))
    bank = inject_bank(
        backbone,
        target_modules=rf".*layers\.({top})\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj",
        n_slots=len(users),
        max_rank=args.rank,
    )
    prefix = FrozenPrefix.for_bank(
        bank,
        identity=f"{backbone.fingerprint.digest}/{backbone.quantization}/cpu",
        pad_id=pad_token_id(tokenizer),
    )
    slots = {u: i for i, u in enumerate(users)}
    for u in users:
        bank.init_slot(
            slots[u], config.slot_config(layer_names=list(bank.layers)), seed=slots[u] + 1000 * args.seed
        )
    base_held = {
        u: pair_logps(bank, tokenizer, held[u], [[]] * len(held[u]), max_seq_len=192, prefix=prefix)
        for u in users
    }

    t0 = time.perf_counter()
    if args.pair_anchors:  # the training pairs' content, the base's own answers, as anchors too
        anchors += [
            Example(30_000 + i, p, a, "sft") for i, (p, a) in enumerate(zip(train_p, train_a, strict=True))
        ]
    tasks = [SlotTraining(slots[u], u, train[u], (), anchors=anchors) for u in users]
    if args.load_adapters is not None:  # the adapters of an earlier run with the same arguments
        saved = torch.load(args.load_adapters)
        for u in users:
            bank.load_slot(slots[u], saved["adapters"][u], bank.slot_info(slots[u]).config, replace=True)
        results: dict[str, dict[str, float]] = saved["metrics"]
    else:
        results = {r.key: r.metrics for r in train_slots(bank, tokenizer, tasks, config, prefix=prefix)}
    trained = {u: bank.slot_state_dict(slots[u]) for u in users}
    if args.save_adapters is not None:
        torch.save({"adapters": trained, "metrics": results}, args.save_adapters)
    train_s = time.perf_counter() - t0
    logger.info("trained %d users, %d steps, in %.0f s", len(users), args.steps, train_s)

    judge_prompts = list(EVAL_PROMPTS[: args.judge_prompts])
    # every general question with a known answer (QA's fact check) is answered too (one generation for both)
    fact_prompts = all_fact_prompts()
    asked = judge_prompts + [p for p in fact_prompts if p not in judge_prompts]
    # the judge again on prompts spread over EVAL_PROMPTS' seven categories (QA's probe order: capitals, arithmetic,
    # facts, how-to, ...), where a longer answer has something to say; the first N are capitals and arithmetic
    spread_prompts = probe_prompts(args.judge_prompts)
    generated_prompts = asked + [p for p in spread_prompts if p not in asked]
    routes: list[list[tuple[int, float]]] = [[]] + [[(slots[u], 1.0)] for u in users]
    general = [
        Example(i, p, a, "sft")
        for i, (p, a) in enumerate(zip(retention_prompts, base_general, strict=True))
        if a
    ]
    # QA's general-capability guard: the probe set's loss (the base's own answers) may move < epsilon from the base's
    probe = probe_examples(backbone, bank=bank)
    base_probe = evaluate(bank, tokenizer, probe, slot=None, max_seq_len=192)
    base_forced = teacher_forced(bank, tokenizer, general, None)
    base_acc, base_body = forced_accuracy(base_forced), forced_accuracy(base_forced, body=True)
    base_choices = chosen_right(choice_scores(bank, tokenizer, None)) if args.choices else []
    by_scale: dict[float, dict[str, dict[str, float]]] = {}
    answers_by_scale: dict[float, dict[str, dict[str, str]]] = {}
    for scale in args.scales:
        # from the trained weights each time, so a scale of 1.0 after another restores them
        scale_adapters(bank, {slots[u]: trained[u] for u in users}, scale)
        if scale != 1.0:
            print(f"\nAdapters' weight change scaled by {scale}:")
        figures: dict[str, dict[str, float]] = {}
        generated = generate_answers(
            backbone.model,
            tokenizer,
            [p for _ in routes for p in generated_prompts],
            args.judge_tokens,
            bank=bank,
            routes=[r for r in routes for _ in generated_prompts],
            trim=False,
        )
        width = len(generated_prompts)
        every = [
            dict(zip(generated_prompts, generated[i * width : (i + 1) * width], strict=True))
            for i in range(len(routes))
        ]
        answered = [{p: a[p] for p in asked} for a in every]  # what the looping and facts figures read
        by_route = [[a[p] for p in judge_prompts] for a in every]
        spread = [[a[p] for p in spread_prompts] for a in every]
        base_right = [p for p in fact_prompts if says_answer(p, answered[0][p])]
        logger.info("the base answers %d of %d fact prompts right", len(base_right), len(fact_prompts))
        sampled = (
            sampled_facts(backbone, bank, routes, args.sampled_facts, args.sample_temperature)
            if args.sampled_facts > 0
            else None
        )
        for i, u in enumerate(users):
            style = u.split("-")[0]
            policy = pair_logps(
                bank, tokenizer, held[u], [[(slots[u], 1.0)]] * len(held[u]), max_seq_len=192, prefix=prefix
            )
            base = base_held[u]
            margins = dpo_terms(*policy.T, *base.T, beta=config.dpo_beta).margins
            forced = teacher_forced(bank, tokenizer, general, slots[u])
            figures[u] = {
                "held_out_accuracy_base_raw_logp": float((base[:, 0] > base[:, 1]).double().mean()),
                "held_out_accuracy": preference_accuracy(margins),
                "judge_base": sum(map(JUDGES[style], by_route[0])) / len(judge_prompts),
                "judge_adapter": sum(map(JUDGES[style], by_route[i + 1])) / len(judge_prompts),
                "judge_spread_base": sum(map(JUDGES[style], spread[0])) / len(spread_prompts),
                "judge_spread_adapter": sum(map(JUDGES[style], spread[i + 1])) / len(spread_prompts),
                # the judge on the user's own held-out pairs: does it accept the chosen side and reject the other?
                "judge_validity": judge_validity(JUDGES[style], held[u]),
                "retention": forced_accuracy(forced) / base_acc,
                "retention_body": forced_accuracy(forced, body=True) / base_body,
                **retention_by_margin(base_forced, forced),
                # of the fact prompts the base answers right, the share the adapter's greedy answer still gets right
                "facts_kept": facts_kept(
                    {p: answered[0][p] for p in fact_prompts}, {p: answered[i + 1][p] for p in fact_prompts}
                ).share,
                # QA's looping-answers rule: the share of the greedy answers that loop, minus the base's
                "looping_increase": (
                    sum(map(loops, answered[i + 1].values())) - sum(map(loops, answered[0].values()))
                )
                / len(asked),
                **probe_drifts(evaluate(bank, tokenizer, probe, slot=slots[u], max_seq_len=192), base_probe),
                "dpo_loss_first": results[u].get("dpo_loss_first", float("nan")),
                "dpo_loss": results[u].get("dpo_loss", float("nan")),
            }
            # concise/detailed judged by where the answer stops, as the pairs state the preference
            if style in SENTENCE_JUDGES:
                sentences = SENTENCE_JUDGES[style]
                figures[u] |= {
                    "judge_sentences_validity": judge_validity(sentences, held[u]),
                    "judge_sentences_base": sum(map(sentences, spread[0])) / len(spread_prompts),
                    "judge_sentences_adapter": sum(map(sentences, spread[i + 1])) / len(spread_prompts),
                }
            if args.choices:  # general knowledge as multiple choice, scored by likelihood, against the base
                figures[u] |= choice_figures(
                    base_choices, chosen_right(choice_scores(bank, tokenizer, slots[u]))
                )
            if sampled is not None:  # sampled answers to the known-answer questions, against the base's
                base_q, adapter_q = sampled[0], sampled[i + 1]
                figures[u] |= {
                    "facts_sampled_base": statistics.fmean(base_q),
                    "facts_sampled": statistics.fmean(adapter_q),
                    "facts_sampled_retention": statistics.fmean(adapter_q)
                    / max(statistics.fmean(base_q), 1e-9),
                    # one-sided signed-rank test, over the questions, that the adapter answers right less often
                    "facts_sampled_worse_p": signed_rank_p(
                        [b - a for b, a in zip(base_q, adapter_q, strict=True)]
                    ),
                }
            logger.info("%s: %s | sample: %r", u, figures[u], by_route[i + 1][0][:160])

        print(
            "\n| user | held-out acc. base (raw log-p) | held-out acc. (reward margin) | judge base | judge adapter | judge, seven categories: base / adapter | retention | retention, answer body | facts kept | QA probe drift (bound 0.25): whole / body | looping answers vs base (QA bound +10 %) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for u, f in figures.items():
            print(
                f"| {u} | {f['held_out_accuracy_base_raw_logp']:.0%} | {f['held_out_accuracy']:.0%} | "
                f"{f['judge_base']:.0%} | {f['judge_adapter']:.0%} | {f['judge_spread_base']:.0%} / {f['judge_spread_adapter']:.0%} | {f['retention']:.1%} | {f['retention_body']:.1%} | {f['facts_kept']:.0%} | {f['probe_drift']:+.3f} / {f['probe_drift_body']:+.3f} | {f['looping_increase']:+.0%} |"
            )
        if sampled is not None:
            print(
                f"\nSampled answers to the {len(fact_prompts)} known-answer questions "
                f"({args.sampled_facts} each, temperature {args.sample_temperature:g}): base right "
                f"{statistics.fmean(sampled[0]):.1%}; per adapter right / relative to the base: "
                + ", ".join(
                    f"{u} {f['facts_sampled']:.1%} / {f['facts_sampled_retention']:.1%} "
                    f"(worse than the base: signed-rank p={f['facts_sampled_worse_p']:.3g})"
                    for u, f in figures.items()
                )
            )
        print(
            "\nThe judge on each user's own held-out pairs (validity: it accepts the chosen answer and rejects the "
            "rejected one), and for concise/detailed the sentence judge (the answer stops after its first sentence, "
            "or goes on) on the seven categories' prompts:\n\n"
            "| user | judge validity | sentence judge validity | sentence judge: base / adapter |\n"
            "| --- | --- | --- | --- |"
        )
        for u, f in figures.items():
            sentence_cells = (
                f"{f['judge_sentences_validity']:.0%} | {f['judge_sentences_base']:.0%} / "
                f"{f['judge_sentences_adapter']:.0%}"
                if "judge_sentences_validity" in f
                else "- | -"
            )
            print(f"| {u} | {f['judge_validity']:.0%} | {sentence_cells} |")
        if args.choices:
            print(
                f"\nGeneral knowledge as multiple choice ({len(base_choices)} items, general_choices.py): base right "
                f"{sum(base_choices) / len(base_choices):.1%}\n\n"
                "| user | right | relative to the base | lost / gained | worse than the base (McNemar p) |\n"
                "| --- | --- | --- | --- | --- |"
            )
            for u, f in figures.items():
                print(
                    f"| {u} | {f['choices']:.1%} | {f['choices_retention']:.1%} | "
                    f"{f['choices_lost']:.0f} / {f['choices_gained']:.0f} | {f['choices_worse_p']:.3g} |"
                )
        bins = [f"{low:g}-{high:g}" for low, high in itertools.pairwise(MARGIN_BINS)]
        print(
            "\n| user | "
            + " | ".join(f"base's lead {b} nats: share / kept" for b in bins)
            + " | tokens missed: all / adapter ends there |"
        )
        print("| --- |" + " --- |" * (len(bins) + 1))
        for u, f in figures.items():
            cells = [f"{f['share_' + b]:.0%} / {f['kept_' + b]:.0%}" for b in bins]
            cells.append(f"{f['misses']:.1%} / {f['misses_ending']:.1%}")
            print(f"| {u} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
        if args.qa:
            decisions = qa_decisions(backbone, bank, held, slots, config.dpo_beta, prefix)
            print("\n| user | QA (default policy, first version) | failed rules |")
            print("| --- | --- | --- |")
            for u, failed in decisions.items():
                print(f"| {u} | {'reject' if failed else 'promote'} | {' / '.join(failed) or '-'} |")
            sys.stdout.flush()
        # every greedy answer, by route (the base first), for reading what the figures count
        answers_by_scale[scale] = {name: every[i] for i, name in enumerate(["base", *users])}
        by_scale[scale] = figures
    # one scale: keyed by user, as before the scales existed; several: by user@scale, and the answers by scale
    reported: dict[str, dict[str, float]] = by_scale[args.scales[0]]
    reported_answers: dict[str, Any] = answers_by_scale[args.scales[0]]
    if len(args.scales) > 1:
        reported = {f"{u}@{scale:g}": f for scale, fs in by_scale.items() for u, f in fs.items()}
        reported_answers = {f"{scale:g}": a for scale, a in answers_by_scale.items()}
    if args.json:
        args.json.write_text(json.dumps({"users": reported, "answers": reported_answers}, indent=1))
    if args.timing_steps <= 0:
        return
    # DPO step vs SFT step on the same rows: the DPO users' pairs, and their two sides as SFT rows
    pair_users = list(args.styles)
    dpo_tasks = [SlotTraining(slots[u], u, train[u], ()) for u in pair_users]
    sft_tasks = [
        SlotTraining(slots[u], u, [s for p in train[u] for s in pair_sides(p)], ()) for u in pair_users
    ]
    timing = config.with_changes(max_steps=args.timing_steps)
    sft_timing = timing.with_changes(dpo_weight=0.0, batch_size=2 * args.pairs_per_step)
    dpo_s: list[float] = []
    sft_s: list[float] = []
    for _ in range(2):  # interleaved, so load changes hit both alike
        dpo_s += step_times(bank, backbone, dpo_tasks, timing, prefix)
        sft_s += step_times(bank, backbone, sft_tasks, sft_timing, prefix)
    summary = {
        "train_s": train_s,
        "dpo_step_s": statistics.median(dpo_s),
        "sft_step_s": statistics.median(sft_s),
        "dpo_over_sft_step": statistics.median(dpo_s) / statistics.median(sft_s),
        "total_s": time.perf_counter() - started,
    }
    print(f"\n{json.dumps(summary)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"users": reported, "summary": summary, "args": vars(args), "answers": reported_answers},
                default=str,
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
