"""Training step time on the real backbone: all layers, top N layers with the frozen-prefix cache, top N without.

Protocol: SmolLM2-135M-Instruct (``builtin:smollm2-135m``) in nf4 on CPU, a bank of rank-8 adapters on every
linear module, K users (4 and 8) trained together by ``train_slots``, 8 sequences per user per step, examples
rendered with the chat template (about 50 tokens each, completions about 10). Three conditions:

- ``all``: adapters on all 30 layers, every step through the whole model;
- ``top N + prefix``: adapters on the top N layers, the states entering layer 30-N computed once per example
  (``FrozenPrefix``), each step through the top N layers only, logits only at completion positions;
- ``top N, no prefix``: adapters on the top N layers, every step through the whole model (PEFT's
  ``layers_to_transform``: the anchor);
- ``top N + prefix + dense views``: as ``top N + prefix``, and the 4-bit layers of the top N computed from
  dense copies made once per job (``lorafleet.adapters.dense``; the trainer's default on CPU). The other
  conditions dequantise per call, as bitsandbytes does.

Step time is the median over the steps after the first epoch (so the prefix's one-time cost is reported apart, as
``prefix s``: the time of the first epoch minus its steps at steady-state speed), in each of ``--repeats`` runs;
the table gives medians over runs and the speed-up against ``all`` measured in the same run. Holdout accuracy at
equal steps (teacher-forced token accuracy on unseen paraphrases) comes from the same runs.

QA's cost per candidate before and after prefix reuse: the matrix QA scores (base, previous, candidate and a
50/50 mixture over the user's holdout and the probe set) timed with and without a shared prefix.

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_training.py`` (about 15 minutes on 2
cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

from lorafleet.adapters import AdapterBank, inject_bank  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.backbone import Backbone, load_backbone  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.dataset import pad_token_id  # noqa: E402
from lorafleet.training.metrics import score_examples, summarize  # noqa: E402
from lorafleet.training.personal_facts import make_users, user_examples  # noqa: E402
from lorafleet.training.trainer import SlotTraining, train_slots  # noqa: E402

logger = logging.getLogger("bench_training")


@dataclass(frozen=True)
class Condition:
    name: str
    layers: str
    prefix: bool
    #: dense views of the 4-bit layers that run every step (the trainer's default on CPU); False: dequantise
    #: per call, as bitsandbytes does
    dense: bool = False


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--top", type=int, default=8, help="N of the top-N conditions")
    parser.add_argument("--users", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="K=4, 6 steps, 1 repeat")
    parser.add_argument(
        "--data-dir", default=None, help="where the converted backbone lives (default: a temp dir)"
    )
    return parser.parse_args()


def step_bench_setup(
    description: str, *, steps: int
) -> tuple[argparse.Namespace, Backbone, AdapterBank, list]:
    """What the training-step benchmarks share (``bench_train_step``, ``bench_shared_start``): their options
    (``--layers``, ``--users``, ``--steps``, ``--repeats``, ``--data-dir``), SmolLM2 in nf4 with a bank of a slot
    per user, and the users of the personal-facts set."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=10, help="adapters on the top N layers")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=".lorafleet", help="where the converted backbone lives")
    args = parser.parse_args()
    backbone = load_backbone("builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=args.data_dir)
    bank = inject_bank(backbone, n_slots=args.users, max_rank=8)
    return args, backbone, bank, make_users(args.users, seed=0)


def timed_job(
    bank: AdapterBank,
    tokenizer: object,
    tasks: list[SlotTraining],
    config: TrainingConfig,
    prefix: object,
    *,
    skip: int,
) -> tuple[float, float]:
    """A ``train_slots`` job: its median step time (the steps after the first ``skip``) and its whole time."""
    marks: list[float] = []
    started = time.perf_counter()
    train_slots(
        bank,
        tokenizer,
        tasks,
        config,
        progress=lambda *_: marks.append(time.perf_counter()),
        progress_every=1,
        prefix=prefix,  # type: ignore[arg-type]
    )
    job = time.perf_counter() - started
    return statistics.median(b - a for a, b in zip(marks[skip:], marks[skip + 1 :], strict=False)), job


def tasks_for(users: list, bank: AdapterBank, config: TrainingConfig) -> list[SlotTraining]:
    out = []
    for slot, user in enumerate(users):
        bank.init_slot(slot, config.slot_config(layer_names=list(bank.layers)), seed=slot, replace=True)
        train = user_examples(user, rounds=[1], split="train")
        holdout = user_examples(user, rounds=[1], split="eval")
        out.append(SlotTraining(slot, user.key, train, holdout))
    return out


def run_condition(backbone: Backbone, bank: AdapterBank, users: list, cond: Condition, steps: int) -> dict:
    config = TrainingConfig(
        rank=8, alpha=16, dropout=0.0, layers=cond.layers, learning_rate=1e-3, max_steps=steps, batch_size=8
    )
    tasks = tasks_for(users, bank, config)
    prefix = (
        FrozenPrefix.for_bank(
            bank, identity=f"bench-{time.monotonic()}", pad_id=pad_token_id(backbone.tokenizer)
        )
        if cond.prefix
        else None
    )
    marks: list[float] = []
    started = time.perf_counter()
    results = train_slots(
        bank,
        backbone.tokenizer,
        tasks,
        config,
        progress=lambda *_: marks.append(time.perf_counter()),
        progress_every=1,
        prefix=prefix,
        dense_budget_bytes=None if cond.dense else 0,
    )
    total = time.perf_counter() - started
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    epoch = max(len(t.train) for t in tasks) // config.batch_size + 1
    steady = statistics.median(gaps[epoch:]) if len(gaps) > epoch else statistics.median(gaps)
    accuracy = statistics.median(r.metrics.get("holdout_token_accuracy_after", float("nan")) for r in results)
    return {"step": steady, "total": total, "accuracy": accuracy}


def qa_cost(backbone: Backbone, bank: AdapterBank, users: list, top: int) -> dict[str, float]:
    """One candidate's QA matrix (base, previous, candidate, mixture) on its holdout, with and without prefix."""
    config = TrainingConfig(rank=8, alpha=16, dropout=0.0, layers=f"top {top}")
    tasks = tasks_for(users[:2], bank, config)
    examples = list(tasks[0].holdout) * 2
    columns = [[], [(1, 1.0)], [(0, 1.0)], [(0, 0.5), (1, 0.5)]]
    rows = [e for _ in columns for e in examples]
    routes = [c for c in columns for _ in examples]
    out = {}
    for name, use in (("without prefix", False), ("with prefix", True)):
        prefix = (
            FrozenPrefix.for_bank(
                bank, identity=f"qa-{time.monotonic()}", pad_id=pad_token_id(backbone.tokenizer)
            )
            if use
            else None
        )
        started = time.perf_counter()
        summarize(score_examples(bank, backbone.tokenizer, rows, routes, max_seq_len=256, prefix=prefix))
        out[name] = time.perf_counter() - started
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.quick:
        args.users, args.steps, args.repeats = [4], 6, 1
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        backbone = load_backbone(
            args.backbone, quantization=args.quantization, device="cpu", data_dir=data_dir
        )
        bank = inject_bank(backbone, n_slots=max(args.users), max_rank=8)
        conditions = [
            Condition("all layers", "all", False),
            Condition(f"top {args.top} + prefix", f"top {args.top}", True),
            Condition(f"top {args.top} + prefix + dense views", f"top {args.top}", True, dense=True),
            Condition(f"top {args.top}, no prefix", f"top {args.top}", False),
        ]
        print(f"backbone {args.backbone} ({args.quantization}), threads {torch.get_num_threads()}")
        for k in args.users:
            users = make_users(k, seed=0)
            runs: dict[str, list[dict]] = {c.name: [] for c in conditions}
            for repeat in range(args.repeats):
                for cond in conditions:  # interleaved, so load changes hit every condition alike
                    runs[cond.name].append(run_condition(backbone, bank, users, cond, args.steps))
                    print(f"K={k} run {repeat + 1}: {cond.name}: {runs[cond.name][-1]}", flush=True)
            print(
                f"\n| K={k} | s/step | speed-up vs all | first-epoch total s | holdout token acc @ {args.steps} steps |"
            )
            print("| --- | --- | --- | --- | --- |")
            base = [r["step"] for r in runs[conditions[0].name]]
            for cond in conditions:
                steps = [r["step"] for r in runs[cond.name]]
                ratio = statistics.median(b / s for b, s in zip(base, steps, strict=True))
                print(
                    f"| {cond.name} | {statistics.median(steps):.2f} | {ratio:.1f}x | "
                    f"{statistics.median(r['total'] for r in runs[cond.name]):.1f} | "
                    f"{statistics.median(r['accuracy'] for r in runs[cond.name]):.3f} |"
                )
        costs = [qa_cost(backbone, bank, make_users(2, seed=1), args.top) for _ in range(args.repeats)]
        before = statistics.median(c["without prefix"] for c in costs)
        after = statistics.median(c["with prefix"] for c in costs)
        print(
            f"\nQA matrix of one candidate (4 columns): {before:.1f} s without prefix, {after:.1f} s with "
            f"({statistics.median(c['without prefix'] / c['with prefix'] for c in costs):.1f}x)"
        )


if __name__ == "__main__":
    main()
