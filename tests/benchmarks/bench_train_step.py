"""A training job's time on the real backbone, before and after two changes to the LoRA layers (2026-12-05).

- **dropout**: PEFT-style LoRA dropout drew its keep mask with ``F.dropout`` (a Bernoulli draw per element);
  ``lorafleet.adapters.linear.lora_dropout`` takes four elements' draws from one 64-bit random word.
- **stacked runs**: a training step's rows come in equal runs per user; each run's LoRA delta was two matmuls of
  its own plus a split and a concatenation per module; ``BankLinear._stacked_delta`` computes every run's delta
  as two batched matmuls over the stacked slots.

Protocol: SmolLM2-135M-Instruct in nf4 on CPU, ``train_slots`` with the frozen-prefix cache, the training
defaults (rank 8, all linear modules, dropout 0.05, 6 rows per user a step) on the top ``--layers`` layers,
``--users`` users of the personal-facts set, ``--steps`` steps per job. Conditions run interleaved, ``--repeats``
times; the table gives medians: the step time (median of the steps after the third), the whole job
(prefix, holdout scores before and after, steps) and the speed-ups against ``before`` measured in the same
repeat. The "before" condition puts the replaced code back by monkeypatching (kept here, not in the library).
The two conditions draw different dropout masks from the same distribution: they train alike, not identically.

    .venv/bin/python tests/benchmarks/bench_train_step.py [--layers 10] [--repeats 3] [--data-dir DIR]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_training import step_bench_setup, tasks_for, timed_job  # noqa: E402

import lorafleet.adapters.linear as linear  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.dataset import pad_token_id  # noqa: E402

SHIPPED = {
    "dropout": linear.lora_dropout,
    "stacked": linear.BankLinear._stacked_delta,
}


def _bernoulli_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True)


def _no_stacking(self: linear.BankLinear, xa: torch.Tensor, segments: object) -> None:
    return None


def use(condition: str) -> None:
    """Put the library's code for ``condition`` in place: ``before`` (both replaced) or ``after``."""
    before = condition == "before"
    linear.lora_dropout = _bernoulli_dropout if before else SHIPPED["dropout"]  # type: ignore[assignment]
    linear.BankLinear._stacked_delta = _no_stacking if before else SHIPPED["stacked"]  # type: ignore[method-assign,assignment]


def main() -> None:
    args, backbone, bank, users = step_bench_setup(__doc__ or "", steps=12)
    print(
        f"SmolLM2-135M nf4, top {args.layers} layers, {args.users} users, threads {torch.get_num_threads()}"
    )
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for repeat in range(args.repeats):
        for condition in runs:  # interleaved, so load changes on the machine hit both alike
            use(condition)
            config = TrainingConfig(layers=f"top {args.layers}", max_steps=args.steps)
            tasks = tasks_for(users, bank, config)
            prefix = FrozenPrefix.for_bank(
                bank, identity=f"bench-{time.monotonic()}", pad_id=pad_token_id(backbone.tokenizer)
            )
            step, job = timed_job(bank, backbone.tokenizer, tasks, config, prefix, skip=3)
            runs[condition].append((step, job))
            print(f"repeat {repeat + 1}: {condition}: {step:.2f} s/step, job {job:.1f} s", flush=True)
    use("after")
    print("\n| condition | s/step | speed-up | job s | speed-up |\n| --- | --- | --- | --- | --- |")
    for condition, values in runs.items():
        step_up = statistics.median(b[0] / v[0] for b, v in zip(runs["before"], values, strict=True))
        job_up = statistics.median(b[1] / v[1] for b, v in zip(runs["before"], values, strict=True))
        print(
            f"| {condition} | {statistics.median(v[0] for v in values):.2f} | {step_up:.2f}x | "
            f"{statistics.median(v[1] for v in values):.1f} | {job_up:.2f}x |"
        )


if __name__ == "__main__":
    main()
