"""Quality of personal adapters on the real backbone (SmolLM2-135M-Instruct): facts learnt, leaks, retention, forgetting.

Protocol, per seed (users, their values and the train/eval phrasing split all change with the seed):

- K users (``lorafleet.training.personal_facts``), each with 4 facts per round; 8 phrasings of each question
  train, the other 6 are unseen paraphrases that evaluate. All users train together, one ``train_slots`` call
  per round, adapters (rank 8, every linear module) on the top N layers with the frozen-prefix cache.
- Anchors: the base model's own greedy answers to 42 general prompts (``general_prompts.ANCHOR_PROMPTS``), a
  seeded sample of ``anchor_ratio`` of each user's rows. Round 1 trains a second copy of every user without
  anchors, side by side in the same job.
- Contrast rows (``--contrast-ratio``, ``lorafleet.training.contrast``): a seeded sample of each user's training
  prompts asked about a third party, with the user's answer, trained as anchors with no likelihood on it.
- Rounds 2 and 3 continue from the round-1 (anchored) adapter with that round's new facts: one copy with a replay
  sample of older records (``replay_ratio`` per new record), one without, side by side; both keep anchors.

Measured on answers a person would read (greedy generation through the chat template):

- accuracy: share of unseen paraphrases whose answer states the user's value (``answer_has_fact``), base and
  adapters; forgetting: round-1 accuracy after round 1 minus after round 3;
- cross-user leakage: share of a user's answers that contain another user's value;
- retention: share of answers to the 63 never-trained general prompts (``EVAL_PROMPTS``) that contain no
  personal value the base's answer did not already contain, and the mean per-token KL(base || adapter) and NLL
  increase, teacher-forced on the base's own answers to those prompts;
- wall time per round (training, and the evaluation apart).

nf4 on CPU: bitsandbytes dequantises every weight on every forward; ``--dequantize-once`` (the default) swaps
each 4-bit layer for an fp32 one holding its dequantised weight, after checking that the logits are identical,
so the numbers are the nf4 model's and decoding is not dominated by dequantising.

Run from the repository root (``--help`` for the flags; ``--quick`` for a smoke run of a few minutes):

    .venv/bin/python tests/benchmarks/bench_quality_real.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from quality_real_eval import (  # noqa: E402
    Judged,
    Row,
    answer_rows,
    cached_answers,
    dequantize_once,
    gated_rows,
    general_rows,
    judge,
    kl_to_base,
    mixture_rows,
    personal_rows,
    probe_logits,
)

from lorafleet.adapters import AdapterBank, inject_bank  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.backbone import Backbone, load_backbone  # noqa: E402
from lorafleet.routing.embeddings import (  # noqa: E402
    common_direction,
    embed_prompts,
    routing_key,
    routing_key_and_claim,
)
from lorafleet.routing.gates import GENERAL_MARGIN  # noqa: E402
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS, TrainingConfig  # noqa: E402
from lorafleet.training.contrast import CONTRAST_FIRST_ID, sample_contrast_rows  # noqa: E402
from lorafleet.training.dataset import Example, pad_token_id, reservoir_sample  # noqa: E402
from lorafleet.training.general_prompts import (  # noqa: E402
    ANCHOR_FIRST_ID,
    ANCHOR_MAX_NEW_TOKENS,
    ANCHOR_PROMPTS,
    EVAL_PROMPTS,
    anchor_examples,
    general_exemplars,
)
from lorafleet.training.personal_facts import PersonalUser, make_users, user_examples  # noqa: E402
from lorafleet.training.trainer import SlotTraining, train_slots  # noqa: E402

logger = logging.getLogger("bench_quality_real")
#: the product's training defaults, which every flag below starts from
_D = TrainingConfig()


@dataclass
class Context:
    """What every seed shares: the backbone, its bank and prefix, the anchor pool and the base's answers."""

    args: argparse.Namespace
    backbone: Backbone
    bank: AdapterBank
    prefix: FrozenPrefix | None
    layer: int
    anchors: list[Example]
    base_general: dict[str, str]
    kl_examples: list[Example]
    config: TrainingConfig


@dataclass
class SeedResult:
    """Figures of one seed (keys in ``FIGURES``) and sample answers for the report."""

    seed: int
    figures: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    #: every general answer judged leaked or framed, "arm | user | prompt -> answer" (for the JSON file)
    leaks: list[str] = field(default_factory=list)
    #: every personal answer that misses its fact, "arm | user | prompt -> answer" (for the JSON file)
    misses: list[str] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument(
        "--data-dir", default=".lorafleet", help="holds the converted backbone and answer caches"
    )
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=_D.max_steps, help="optimizer steps per round")
    parser.add_argument(
        "--min-epochs",
        type=float,
        default=SERVICE_TRAINING_DEFAULTS["min_epochs"],
        help="passes over a round's rows at least (more steps than --steps when a round brings more); the services'",
    )
    parser.add_argument("--lr", type=float, default=_D.learning_rate)
    parser.add_argument("--rank", type=int, default=_D.rank)
    parser.add_argument("--alpha", type=float, default=_D.alpha)
    parser.add_argument("--dropout", type=float, default=_D.dropout)
    parser.add_argument(
        "--batch", type=int, default=_D.batch_size, help="rows per user per step, anchors included"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=int(str(_D.layers).split()[-1]),
        help="adapters on the top N decoder layers",
    )
    parser.add_argument(
        "--anchor-ratio", type=float, default=_D.anchor_ratio, help="share of a user's rows that are anchors"
    )
    parser.add_argument(
        "--lr-ratio-b",
        type=float,
        default=SERVICE_TRAINING_DEFAULTS.get("lr_ratio_b", _D.lr_ratio_b),
        help="LoRA+: the B matrices' learning rate over the A matrices' (the services' lr_ratio_b)",
    )
    parser.add_argument(
        "--anchor-mode",
        choices=["sample", "all", "near"],
        default="sample",
        help="sample: a seeded sample of the anchors sized by the ratio (as continual training does); "
        "all: every anchor, the user's examples repeated so anchors are still about the ratio of rows; "
        "near: as many as sample, the anchors whose prompts are nearest the user's (hard negatives)",
    )
    parser.add_argument(
        "--contrast-ratio",
        type=float,
        default=SERVICE_TRAINING_DEFAULTS.get("contrast_ratio", _D.contrast_ratio),
        help="contrast rows per training row (TrainingConfig.contrast_ratio): a seeded sample of each user's "
        "training prompts asked about a third party (lorafleet.training.contrast); 0: none",
    )
    parser.add_argument(
        "--contrast-mode",
        choices=["unlikely", "answered"],
        default="unlikely",
        help="unlikely: the user's answer, no likelihood on it (the trainer's contrast rows); answered: the base "
        "model's own greedy answer to the rewritten prompt, trained as an ordinary anchor",
    )
    parser.add_argument(
        "--anchor-unlikelihood",
        type=float,
        default=_D.anchor_unlikelihood,
        help="weight of the unlikelihood of each user's own answer tokens on its anchor rows "
        "(TrainingConfig.anchor_unlikelihood)",
    )
    parser.add_argument(
        "--anchor-distill",
        type=float,
        default=SERVICE_TRAINING_DEFAULTS.get("anchor_distill", _D.anchor_distill),
        help="weight of KL(base || adapter) on the anchor rows' answer positions (the services' anchor_distill)",
    )
    parser.add_argument(
        "--replay-ratio", type=float, default=_D.replay_ratio, help="replayed old records per new record"
    )
    parser.add_argument(
        "--later-lr",
        type=float,
        default=None,
        help="rounds 2-3: their learning rate (default: --lr, as the services train a continuing version)",
    )
    parser.add_argument(
        "--later-min-epochs",
        type=float,
        default=SERVICE_TRAINING_DEFAULTS.get("continual_min_epochs"),
        help="rounds 2-3: their least passes over the rows (the services' continual_min_epochs; unset: --min-epochs)",
    )
    parser.add_argument(
        "--l2-to-parent",
        type=float,
        default=_D.l2_to_parent,
        help="rounds 2-3: the L2 pull of each adapter to its previous round's weights (TrainingConfig.l2_to_parent)",
    )
    parser.add_argument("--no-plain-arm", action="store_true", help="skip round 1's copy without anchors")
    parser.add_argument(
        "--replay-only",
        action="store_true",
        help="rounds 2-3: skip the arm without replay (half the training; its figures show '-')",
    )
    parser.add_argument(
        "--expand-arm",
        action="store_true",
        help="rounds 2-3: a third arm that keeps each round's adapter and trains a new one for the next round's "
        "facts (no replay), every request routed over the user's adapters by the centroid gate",
    )
    parser.add_argument("--eval-tokens", type=int, default=32, help="max new tokens of evaluated answers")
    parser.add_argument("--general-prompts", type=int, default=len(EVAL_PROMPTS), help="EVAL prompts used")
    parser.add_argument(
        "--general-margins",
        type=float,
        nargs="+",
        default=[GENERAL_MARGIN],
        help="the nearest-general-prompt rule's margins to measure (the rule of versions without a routing claim; "
        "the default's figures fill the table, every margin's are logged and in --json)",
    )
    parser.add_argument(
        "--keep-nf4", dest="dequantize_once", action="store_false", help="dequantise per forward"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the per-seed figures to this file")
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2 users, 30 steps, 2 rounds, 21 prompts"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.users, args.steps, args.rounds, args.general_prompts = [0], 2, 30, 2, 21
    return args


def top_layers_regex(num_layers: int, n: int) -> str:
    """A target-module regex for every linear module of the top ``n`` decoder layers (the bank's layers)."""
    indices = "|".join(str(i) for i in range(num_layers - n, num_layers))
    return rf".*layers\.({indices})\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def setup(args: argparse.Namespace) -> Context:
    """Load the backbone (dequantised once, checked), the anchor pool and base answers (cached), the bank."""
    data_dir = Path(args.data_dir)
    backbone = load_backbone(args.backbone, quantization=args.quantization, device="cpu", data_dir=data_dir)
    if args.dequantize_once and backbone.quantization == "nf4":
        before = probe_logits(backbone)
        replaced = dequantize_once(backbone.model)
        diff = float((probe_logits(backbone) - before).abs().max())
        logger.info("dequantised %d nf4 layers once; max logit difference %.2e", replaced, diff)
        if diff > 1e-4:
            raise SystemExit(f"dequantising once changed the logits by {diff}: rerun with --keep-nf4")
    cache_dir = data_dir / "bench-quality-real"
    started = time.perf_counter()
    anchor_answers = cached_answers(cache_dir, backbone, ANCHOR_PROMPTS, ANCHOR_MAX_NEW_TOKENS, trim=True)
    eval_prompts = list(EVAL_PROMPTS[: args.general_prompts])
    base_answers = cached_answers(cache_dir, backbone, eval_prompts, args.eval_tokens, trim=False)
    logger.info("base answers (anchors, eval) ready in %.0f s", time.perf_counter() - started)
    anchors = [
        Example(ANCHOR_FIRST_ID + i, p, a, "sft")
        for i, (p, a) in enumerate(zip(ANCHOR_PROMPTS, anchor_answers, strict=True))
    ]
    num_layers = int(backbone.model.config.num_hidden_layers)
    bank = inject_bank(
        backbone,
        target_modules=top_layers_regex(num_layers, args.layers),
        n_slots=(2 + (args.rounds if args.expand_arm else 0)) * args.users,
        max_rank=args.rank,
    )
    identity = f"{backbone.fingerprint.digest}/{backbone.quantization}/cpu"
    prefix = FrozenPrefix.for_bank(bank, identity=identity, pad_id=pad_token_id(backbone.tokenizer))
    config = TrainingConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        layers=f"top {args.layers}",
        learning_rate=args.lr,
        lr_ratio_b=args.lr_ratio_b,
        max_steps=args.steps,
        min_epochs=args.min_epochs,
        continual_min_epochs=args.later_min_epochs,
        batch_size=args.batch,
        max_seq_len=160,
        anchor_ratio=args.anchor_ratio,
        anchor_unlikelihood=args.anchor_unlikelihood,
        anchor_distill=args.anchor_distill,
        contrast_ratio=args.contrast_ratio,
        replay_ratio=args.replay_ratio,
        l2_to_parent=args.l2_to_parent,
    )
    base_general = dict(zip(eval_prompts, base_answers, strict=True))
    kl_examples = [Example(i + 1, p, a, "sft") for i, (p, a) in enumerate(base_general.items()) if a]
    return Context(
        args, backbone, bank, prefix, num_layers - args.layers, anchors, base_general, kl_examples, config
    )


def anchors_for(ctx: Context, train: list[Example], salt: str) -> list[Example]:
    """A seeded sample of the anchor pool: ``anchor_ratio`` of the rows once added to the ``train`` examples
    (``--anchor-mode all``: the whole pool, see :func:`with_anchors`; ``near``: the nearest, see
    :func:`near_anchors`)."""
    ratio = ctx.config.anchor_ratio
    if ratio <= 0:
        return []
    if ctx.args.anchor_mode == "all":
        return list(ctx.anchors)
    wanted = min(len(ctx.anchors), math.ceil(ratio / (1 - ratio) * len(train)))
    if ctx.args.anchor_mode == "near":
        return near_anchors(ctx, train, wanted)
    return reservoir_sample(ctx.anchors, wanted, seed=_int_seed(f"anchors/{salt}"))


def near_anchors(ctx: Context, train: list[Example], wanted: int) -> list[Example]:
    """The ``wanted`` anchors whose prompts are nearest any of the user's training prompts: cosine of the base
    model's pooled embeddings with the direction every prompt shares taken out (as the centroid gate scores)."""
    with torch.no_grad():
        pool = general_exemplars(ctx.backbone, ctx.bank)  # [anchors, hidden], ctx.anchors' order; cached
        own = embed_prompts(ctx.backbone, ctx.bank, sorted({e.prompt for e in train}))  # [prompts, hidden]
    shared = common_direction(pool)

    def centred(embedded: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(embedded - (embedded @ shared)[:, None] * shared, dim=-1)

    nearest = (centred(pool) @ centred(own).T).max(dim=1).values  # [anchors]
    order = nearest.argsort(descending=True)[:wanted].tolist()
    return [ctx.anchors[i] for i in sorted(order)]


def with_anchors(ctx: Context, train: list[Example], salt: str) -> tuple[list[Example], list[Example]]:
    """(training examples, anchors) of one task; with every anchor, the examples repeat to keep the ratio."""
    anchors = anchors_for(ctx, train, salt)
    if ctx.config.contrast_ratio > 0:  # as the platform's continual trainer adds them
        rows = sample_contrast_rows(train, ctx.config.contrast_ratio, seed=_int_seed(f"contrast/{salt}"))
        if ctx.args.contrast_mode == "answered":  # the base's own answers: ordinary anchors
            with torch.no_grad(), ctx.bank.base_only():
                rows = anchor_examples(ctx.backbone, [r.prompt for r in rows], first_id=CONTRAST_FIRST_ID)
        anchors += rows
    ratio = ctx.config.anchor_ratio
    if ctx.args.anchor_mode == "all" and anchors:
        repeats = max(1, round((1 - ratio) / ratio * len(anchors) / len(train)))
        train = [e for _ in range(repeats) for e in train]
    return train, anchors


def _int_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def train_round(
    ctx: Context,
    tasks: list[SlotTraining],
    seed: int,
    *,
    lr: float | None = None,
) -> tuple[float, float]:
    """One ``train_slots`` job over every task (at ``lr``, or the config's learning rate); its wall time and this
    process's CPU time, in seconds (on a shared machine the CPU time is the steadier of the two)."""
    started, cpu = time.perf_counter(), time.process_time()

    def progress(step: int, total: int, info: dict[str, Any]) -> None:
        logger.info("step %d/%d: loss %.3f, %.1f s", step, total, info["loss"], time.perf_counter() - started)

    results = train_slots(
        ctx.bank,
        ctx.backbone.tokenizer,
        tasks,
        ctx.config.with_changes(seed=seed, learning_rate=lr or ctx.config.learning_rate),
        prefix=ctx.prefix,
        progress=progress,
    )
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    losses = [f"{r.key} {r.metrics['train_loss_first']:.2f}->{r.metrics['train_loss']:.2f}" for r in results]
    logger.info("trained %d slots in %.0f s (%.0f CPU s): %s", len(tasks), elapsed, cpu, ", ".join(losses))
    return elapsed, cpu


def evaluate(
    ctx: Context,
    users: list[PersonalUser],
    arms: dict[str, dict[str, int]],
    rounds: list[int],
    seed: int,
    *,
    general: bool,
    gated: str | None = None,
    experts: dict[str, list[tuple[int, tuple[float, ...]]]] | None = None,
) -> dict[str, Judged]:
    """Every arm's answers to the unseen paraphrases of ``rounds`` (and the general prompts), one decoding pass;
    with ``experts``, arm ``expand``: each row routed over the user's adapters by the centroid gate."""
    rows: list[Row] = []
    spans: dict[str, tuple[int, int]] = {}
    for name, slots in arms.items():
        start = len(rows)
        rows += personal_rows(users, slots, rounds, seed)
        if general:
            rows += general_rows(users, slots, list(ctx.base_general))
        spans[name] = (start, len(rows))
    if gated is not None:  # arm ``gated`` as serving routes it: the gate may pick the base (arm "gated")
        routing = {u.key: user_routing(ctx, u, rounds, seed) for u in users}
        keys = {user: key for user, (key, _) in routing.items()}
        claims = {user: claim for user, (_, claim) in routing.items()}
        # "gated": the base answers what the adapter does not claim (versions that store a claim)
        start = len(rows)
        rows += gated_rows(ctx.backbone, ctx.bank, rows[slice(*spans[gated])], keys, claims=claims)
        spans["gated"] = (start, len(rows))
        # "gated@m": the nearest general prompt at margin m (versions without a claim)
        for margin in ctx.args.general_margins:
            start = len(rows)
            rows += gated_rows(ctx.backbone, ctx.bank, rows[slice(*spans[gated])], keys, margin=margin)
            spans[f"gated@{margin:g}"] = (start, len(rows))
    if experts is not None:
        start, unrouted = len(rows), personal_rows(users, {u.key: None for u in users}, rounds, seed)
        if general:
            unrouted += general_rows(users, {u.key: None for u in users}, list(ctx.base_general))
        rows += mixture_rows(ctx.backbone, ctx.bank, unrouted, experts)
        spans["expand"] = (start, len(rows))
    answers = answer_rows(ctx.backbone, ctx.bank, rows, ctx.args.eval_tokens)
    return {name: judge(rows[a:b], answers[a:b], users, ctx.base_general) for name, (a, b) in spans.items()}


def user_routing(
    ctx: Context, user: PersonalUser, rounds: list[int], seed: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The routing key and claim continual training stores with the user's adapter: its training prompts,
    embedded once (``routing_key_and_claim``, against the shipped general prompts)."""
    prompts = [e.prompt for e in user_examples(user, rounds=rounds, split="train", seed=seed)]
    general = general_exemplars(ctx.backbone, ctx.bank)
    return routing_key_and_claim(ctx.backbone, ctx.bank, prompts, general=general)


def base_accuracy(ctx: Context, users: list[PersonalUser], seed: int) -> float:
    """The base model on every user's unseen paraphrases of all rounds (each question answered once)."""
    rows = personal_rows(users, {u.key: None for u in users}, [1, 2, 3], seed)
    prompts = sorted({r.prompt for r in rows})
    answers = dict(
        zip(
            prompts,
            answer_rows(ctx.backbone, ctx.bank, [Row(p, None) for p in prompts], ctx.args.eval_tokens),
            strict=True,
        )
    )
    return judge(rows, [answers[r.prompt] for r in rows], users, ctx.base_general).accuracy()


def round_one(ctx: Context, users: list[PersonalUser], seed: int, out: SeedResult) -> dict[str, int]:
    """Fresh adapters with anchors (slots 0..K-1) and, unless skipped, without (K..2K-1); their figures."""
    k, arms = len(users), {"anchors": {u.key: i for i, u in enumerate(users)}}
    if not ctx.args.no_plain_arm:
        arms["plain"] = {u.key: k + i for i, u in enumerate(users)}
    slot_config = ctx.config.slot_config(layer_names=list(ctx.bank.layers))
    tasks = []
    for i, user in enumerate(users):
        train = user_examples(user, rounds=[1], split="train", seed=seed)
        held = user_examples(user, rounds=[1], split="eval", seed=seed, first_id=10_000)
        for name, slots in arms.items():
            ctx.bank.init_slot(slots[user.key], slot_config, seed=seed * 100 + i, replace=True)  # same start
            rows, anchors = (
                with_anchors(ctx, train, f"{seed}/{user.key}/1") if name == "anchors" else (train, [])
            )
            tasks.append(SlotTraining(slots[user.key], f"{user.key}/{name}", rows, held, anchors=anchors))
    out.figures["train_s_r1"], out.figures["cpu_s_r1"] = train_round(ctx, tasks, seed)
    started = time.perf_counter()
    judged = evaluate(ctx, users, arms, [1], seed, general=True, gated="anchors")
    kl = arms_kl_to_base(ctx, arms)
    for name, slots in arms.items():
        record_arm(out, f"r1_{name}", judged[name], [kl[s] for s in slots.values()], rounds=[1])
    for name in judged:
        if name.startswith("gated"):
            record_arm(out, f"r1_{name}", judged[name], [], rounds=[1])
    out.figures["eval_s_r1"] = time.perf_counter() - started
    out.samples += samples(judged["anchors"], users[0].key, ctx.base_general, judged.get("plain"))
    return arms["anchors"]


def arms_kl_to_base(ctx: Context, arms: dict[str, dict[str, int]]) -> dict[int, tuple[float, float]]:
    """``kl_to_base`` of every slot of every arm on the context's KL prompts; by slot."""
    slots = [s for a in arms.values() for s in a.values()]
    return kl_to_base(ctx.bank, ctx.backbone.tokenizer, ctx.kl_examples, slots, ctx.prefix, ctx.layer)


def later_round(
    ctx: Context,
    users: list[PersonalUser],
    seed: int,
    r: int,
    arms: dict[str, dict[str, int]],
    out: SeedResult,
    *,
    experts: dict[str, list[tuple[int, tuple[float, ...]]]] | None = None,
) -> None:
    """Round ``r`` for both continuing arms: new facts with replay (``replay``) and without (``noreplay``); with
    ``experts`` (user -> (slot, routing key) of each round's adapter), also a fresh adapter on the new facts that
    joins the user's adapters (arm ``expand``)."""
    tasks = []
    slot_config = ctx.config.slot_config(layer_names=list(ctx.bank.layers))
    for i, user in enumerate(users):
        new = user_examples(user, rounds=[r], split="train", seed=seed, first_id=1000 * r)
        old = user_examples(user, rounds=range(1, r), split="train", seed=seed)
        replay = reservoir_sample(
            old, round(ctx.config.replay_ratio * len(new)), seed=_int_seed(f"replay/{seed}/{user.key}/{r}")
        )
        held = user_examples(user, rounds=[r], split="eval", seed=seed, first_id=10_000 * r)
        for name, train in (("replay", new + replay), ("noreplay", new)):
            if name not in arms:
                continue
            rows, anchors = with_anchors(ctx, train, f"{seed}/{user.key}/{r}/{name}")
            slot = arms[name][user.key]
            # the pull's target: this slot as the previous round left it (continual training pulls to the parent)
            parent = ctx.bank.slot_state_dict(slot) if ctx.config.l2_to_parent > 0 else None
            tasks.append(
                SlotTraining(
                    slot,
                    f"{user.key}/{name}",
                    rows,
                    held,
                    parent_state=parent,
                    anchors=anchors,
                    continues=True,
                )
            )
        if experts is not None:  # a first version on this round's records, as a new adapter would train
            slot = (r + 1) * len(users) + i
            ctx.bank.init_slot(slot, slot_config, seed=seed * 100 + 10 * r + i, replace=True)
            rows, anchors = with_anchors(ctx, new, f"{seed}/{user.key}/{r}/expand")
            tasks.append(SlotTraining(slot, f"{user.key}/expand", rows, held, anchors=anchors))
            prompts = [e.prompt for e in new]
            experts[user.key].append((slot, routing_key(ctx.backbone, ctx.bank, prompts)))
    out.figures[f"train_s_r{r}"], out.figures[f"cpu_s_r{r}"] = train_round(
        ctx, tasks, seed + 1000 * r, lr=ctx.args.later_lr
    )
    started = time.perf_counter()
    last = r == ctx.args.rounds
    judged = evaluate(
        ctx, users, arms, list(range(1, r + 1)), seed, general=last, gated="replay", experts=experts
    )
    kl = arms_kl_to_base(ctx, arms) if last else {}
    for name, slots in arms.items():
        record_arm(
            out,
            f"r{r}_{name}",
            judged[name],
            [kl[s] for s in slots.values()] if last else [],
            rounds=list(range(1, r + 1)),
        )
    for name in judged:
        if name.startswith("gated") or name == "expand":
            record_arm(out, f"r{r}_{name}", judged[name], [], rounds=list(range(1, r + 1)))
    out.figures[f"eval_s_r{r}"] = time.perf_counter() - started


def record_arm(
    out: SeedResult, prefix: str, judged: Judged, kl: list[tuple[float, float]], *, rounds: list[int]
) -> None:
    """An arm's figures under ``prefix``: accuracy (all rounds so far, and round 1), leaks, retention, KL."""
    out.figures[f"{prefix}_acc"] = judged.accuracy(rounds)
    out.figures[f"{prefix}_acc_r1"] = judged.accuracy([1])
    out.figures[f"{prefix}_cross_leak"] = judged.cross_leak_rate()
    if judged.general_leaks:
        out.figures[f"{prefix}_general_clean"] = judged.general_clean()
        out.figures[f"{prefix}_general_unframed"] = judged.general_unframed()
    if kl:
        out.figures[f"{prefix}_kl"] = statistics.median(v[0] for v in kl)
        out.figures[f"{prefix}_dnll"] = statistics.median(v[1] for v in kl)
    out.leaks += [f"{prefix} | {user} | {prompt!r} -> {answer!r}" for user, prompt, answer in judged.flagged]
    out.misses += [f"{prefix} | {user} | {prompt!r} -> {answer!r}" for user, prompt, answer in judged.misses]
    logger.info("%s: %s", prefix, {k: round(v, 4) for k, v in out.figures.items() if k.startswith(prefix)})


def samples(judged: Judged, user: str, base: dict[str, str], plain: Judged | None) -> list[str]:
    """A few answers of one user's anchored adapter (and its plain copy) for the report, base answers beside."""
    lines = []
    personal = [s for s in judged.samples if s[0] == user and s[1] not in base][:4]
    lines += [f"- {p!r} -> {a!r}" for _, p, a in personal]
    general = [s for s in judged.samples if s[0] == user and s[1] in base]
    plain_by_prompt = {p: a for u, p, a in (plain.samples if plain else []) if u == user}
    for _, prompt, answer in general[:: max(1, len(general) // 6)][:6]:
        extra = f"; without anchors {plain_by_prompt[prompt]!r}" if prompt in plain_by_prompt else ""
        lines.append(f"- {prompt!r}: base {base[prompt]!r}; adapter {answer!r}{extra}")
    return lines


def copy_slot(bank: AdapterBank, source: int, target: int) -> None:
    """Load slot ``source``'s adapter (weights and config) into slot ``target``."""
    info = bank.slot_info(source)
    assert info is not None
    bank.load_slot(target, bank.slot_state_dict(source), info.config, replace=True)


def run_seed(ctx: Context, seed: int) -> SeedResult:
    users = make_users(ctx.args.users, seed=seed)
    out = SeedResult(seed)
    out.figures["base_acc"] = base_accuracy(ctx, users, seed)
    anchored = round_one(ctx, users, seed, out)
    if ctx.args.rounds > 1:
        k = len(users)
        arms = {"replay": anchored}
        if not ctx.args.replay_only:  # the no-replay arm starts from a copy of the anchored round-1 adapter
            arms["noreplay"] = {u.key: k + i for i, u in enumerate(users)}
            for user in users:
                copy_slot(ctx.bank, anchored[user.key], arms["noreplay"][user.key])
        experts: dict[str, list[tuple[int, tuple[float, ...]]]] | None = None
        if ctx.args.expand_arm:  # round 1's adapter, copied, is the first of each user's adapters
            experts = {}
            for i, user in enumerate(users):
                copy_slot(ctx.bank, anchored[user.key], 2 * k + i)
                experts[user.key] = [(2 * k + i, user_routing(ctx, user, [1], seed)[0])]
        for r in range(2, ctx.args.rounds + 1):
            later_round(ctx, users, seed, r, arms, out, experts=experts)
        last = ctx.args.rounds
        for name in [*arms, *(["expand"] if experts else [])]:
            out.figures[f"forget_{name}"] = (
                out.figures["r1_anchors_acc_r1"] - out.figures[f"r{last}_{name}_acc_r1"]
            )
    return out


def pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def num(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def pair(figures: dict[str, float], a: str, b: str, fmt: Any = pct) -> str:
    return f"{fmt(figures.get(a, math.nan))} / {fmt(figures.get(b, math.nan))}"


#: the gate's arm without claims at its default margin (``--general-margins``' default)
NEAREST = f"gated@{GENERAL_MARGIN:g}"

ROUND_ONE_COLUMNS: list[tuple[str, Any]] = [
    ("base acc", lambda f: pct(f["base_acc"])),
    ("acc: anchors / none", lambda f: pair(f, "r1_anchors_acc", "r1_plain_acc")),
    ("cross-user leak: anchors / none", lambda f: pair(f, "r1_anchors_cross_leak", "r1_plain_cross_leak")),
    (
        "general clean: anchors / none",
        lambda f: pair(f, "r1_anchors_general_clean", "r1_plain_general_clean"),
    ),
    (
        "no personal frame either: anchors / none",
        lambda f: pair(f, "r1_anchors_general_unframed", "r1_plain_general_unframed"),
    ),
    ("KL nats/token: anchors / none", lambda f: pair(f, "r1_anchors_kl", "r1_plain_kl", num)),
    ("ΔNLL nats/token: anchors / none", lambda f: pair(f, "r1_anchors_dnll", "r1_plain_dnll", num)),
    (
        "served through the gate, claims: acc / cross leak / general clean",
        lambda f: (
            f"{pct(f['r1_gated_acc'])} / {pct(f['r1_gated_cross_leak'])} / {pct(f['r1_gated_general_clean'])}"
        ),
    ),
    (
        "the gate, nearest general prompt: acc / general clean",
        lambda f: pair(f, f"r1_{NEAREST}_acc", f"r1_{NEAREST}_general_clean"),
    ),
    (
        "train s (CPU s) / eval s",
        lambda f: f"{f['train_s_r1']:.0f} ({f['cpu_s_r1']:.0f}) / {f['eval_s_r1']:.0f}",
    ),
]


def last_round_columns(r: int) -> list[tuple[str, Any]]:
    return [
        (f"acc R1..R{r}: replay / none", lambda f: pair(f, f"r{r}_replay_acc", f"r{r}_noreplay_acc")),
        ("R1 acc: replay / none", lambda f: pair(f, f"r{r}_replay_acc_r1", f"r{r}_noreplay_acc_r1")),
        ("forgetting (points): replay / none", lambda f: pair(f, "forget_replay", "forget_noreplay")),
        (
            "cross-user leak: replay / none",
            lambda f: pair(f, f"r{r}_replay_cross_leak", f"r{r}_noreplay_cross_leak"),
        ),
        (
            "general clean: replay / none",
            lambda f: pair(f, f"r{r}_replay_general_clean", f"r{r}_noreplay_general_clean"),
        ),
        ("KL: replay / none", lambda f: pair(f, f"r{r}_replay_kl", f"r{r}_noreplay_kl", num)),
        (
            "served through the gate (replay), claims: acc / general clean",
            lambda f: pair(f, f"r{r}_gated_acc", f"r{r}_gated_general_clean"),
        ),
        (
            "the gate, nearest general prompt: acc / general clean",
            lambda f: pair(f, f"r{r}_{NEAREST}_acc", f"r{r}_{NEAREST}_general_clean"),
        ),
        (
            f"a new adapter a round, gated (expand): acc R1..R{r} / R1 acc / forgetting / general clean",
            lambda f: (
                f"{pct(f.get(f'r{r}_expand_acc', math.nan))} / {pct(f.get(f'r{r}_expand_acc_r1', math.nan))} / "
                f"{pct(f.get('forget_expand', math.nan))} / {pct(f.get(f'r{r}_expand_general_clean', math.nan))}"
            ),
        ),
        ("train s per round", lambda f: " / ".join(f"{f[f'train_s_r{i}']:.0f}" for i in range(1, r + 1))),
        ("train CPU s per round", lambda f: " / ".join(f"{f[f'cpu_s_r{i}']:.0f}" for i in range(1, r + 1))),
        ("eval s per round", lambda f: " / ".join(f"{f[f'eval_s_r{i}']:.0f}" for i in range(1, r + 1))),
    ]


def table(results: list[SeedResult], columns: list[tuple[str, Any]]) -> list[str]:
    """Rows per seed and the median over seeds (of each figure, then formatted)."""
    median = {k: statistics.median(r.figures[k] for r in results) for k in results[0].figures}
    lines = ["| seed | " + " | ".join(c[0] for c in columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for r in results:
        lines.append(f"| {r.seed} | " + " | ".join(c[1](r.figures) for c in columns) + " |")
    lines.append("| **median** | " + " | ".join(c[1](median) for c in columns) + " |")
    return lines


def report(ctx: Context, results: list[SeedResult]) -> str:
    args = ctx.args
    lines = [
        f"backbone {args.backbone} ({args.quantization}{', dequantised once' if args.dequantize_once else ''}), "
        f"users {args.users}, seeds {args.seeds}, rank {args.rank}, alpha {args.alpha}, dropout {args.dropout}, "
        f"top {args.layers} layers, lr {args.lr:g}"
        + (f" (rounds 2-3: {args.later_lr:g})" if args.later_lr else "")
        + f", B matrices at {args.lr_ratio_b:g}x"
        + f", {args.steps} steps (min_epochs {args.min_epochs:g}"
        + (f"; rounds 2-3: {args.later_min_epochs:g}" if args.later_min_epochs is not None else "")
        + "), "
        f"batch {args.batch}/user, "
        f"anchor_ratio {args.anchor_ratio}, replay_ratio {args.replay_ratio}, general eval prompts "
        f"{len(ctx.base_general)}, threads {torch.get_num_threads()}",
        "",
        "Round 1 (accuracy on unseen paraphrases, %; leak and clean shares, %):",
        "",
        *table(results, ROUND_ONE_COLUMNS),
    ]
    if args.rounds > 1:
        lines += ["", f"After round {args.rounds}:", "", *table(results, last_round_columns(args.rounds))]
    lines += [
        "",
        f"Sample answers (seed {results[0].seed}, user-0, round 1, anchored adapter):",
        *results[0].samples,
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lorafleet", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ctx = setup(args)
    results = []
    for seed in args.seeds:
        results.append(run_seed(ctx, seed))
        logger.info("seed %d done at %.0f s", seed, time.perf_counter() - started)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"args": vars(args), "seeds": [vars(r) for r in results]}, indent=1),
                encoding="utf-8",
            )
    print(report(ctx, results))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
