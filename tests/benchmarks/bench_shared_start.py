"""Rows that begin alike, run once per route: a training job, QA-style scoring and greedy answers (2026-12-06).

SmolLM2's chat template puts the same system prompt before every prompt: 24 of the about 36 tokens of a short
rendered question. Above the frozen prefix (the top ``--layers`` layers, where the adapters are) every row ran those
tokens again; ``training.metrics.shared_start`` now runs them once per group of rows routed alike and lets each
row's own tokens attend to its group's keys and values (``DecoderSplit.run_from_shared``). A decoding join does
the same with its prompts' common start (``DecodeBatch.join``: the start's KV cache copied to each row).

Protocol: SmolLM2-135M-Instruct in nf4 on CPU, the services' training defaults (top 10 layers, rank 8, dropout
0.05, 6 rows per user a step, LoRA+ 4), ``--users`` users of the personal-facts set with their holdouts,
``--steps`` steps per job through ``train_slots`` with the frozen-prefix cache; then ``score_examples`` of every
user's training and holdout rows under three columns each (the base, the user's adapter, an even mixture of two
adapters), as QA scores its sets, inside dense views of every layer as QA's scoring runs; then greedy answers (up
to 24 tokens) to every user's holdout questions from the base and from the user's adapter in one batch, as QA
answers them. Conditions ``whole rows``
(``DecoderSplit.shares_starts`` off, and no decoding join shares its start) and ``shared start`` run interleaved, ``--repeats`` times, a fresh prefix
cache each time (its states are computed in both); the table gives medians and the speed-ups against ``whole
rows`` of the same repeat. Dropout draws differ between
the conditions, so they train alike, not identically; the shared start's adapters are also scored with whole rows
(not timed): the largest difference of a row's loss is printed, and how many answers have the same tokens.

    .venv/bin/python tests/benchmarks/bench_shared_start.py [--data-dir DIR] [--repeats 3] [--steps 10]
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
from bench_training import step_bench_setup, tasks_for, timed_job  # noqa: E402

import lorafleet.serving.decode as decode  # noqa: E402
from lorafleet.adapters.dense import dense_budget, dense_views  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.serving.decode import BatchDecoder, RowSpec  # noqa: E402
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS, TrainingConfig  # noqa: E402
from lorafleet.training.dataset import pad_token_id  # noqa: E402
from lorafleet.training.metrics import score_examples  # noqa: E402

CONDITIONS = ("whole rows", "shared start")
SHIPPED_MIN_SHARED_START = decode.MIN_SHARED_START


def answer_specs(tok: object, tasks: list) -> list[RowSpec]:
    """Every holdout question as a chat prompt, from the base and from its user's adapter."""
    specs = []
    for t in tasks:
        for e in t.holdout:
            ids = tok.apply_chat_template(  # type: ignore[attr-defined]
                [{"role": "user", "content": e.prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            specs += [RowSpec(tuple(ids), routes, max_new_tokens=24) for routes in ((), ((t.slot, 1.0),))]
    return specs


def main() -> None:
    args, backbone, bank, users = step_bench_setup(__doc__ or "", steps=10)
    tok = backbone.tokenizer
    defaults = {k: v for k, v in SERVICE_TRAINING_DEFAULTS.items() if k in {"lr_ratio_b"}}
    config = TrainingConfig(layers=f"top {args.layers}", max_steps=args.steps, **defaults)
    print(
        f"SmolLM2-135M nf4, top {args.layers} layers, {args.users} users, {args.steps} steps, "
        f"threads {torch.get_num_threads()}"
    )
    runs: dict[str, list[tuple[float, float, float, float]]] = {c: [] for c in CONDITIONS}
    for repeat in range(args.repeats):
        for condition in CONDITIONS:  # interleaved, so load changes on the machine hit both alike
            tasks = tasks_for(users, bank, config)
            prefix = FrozenPrefix.for_bank(
                bank, identity=f"bench-{time.monotonic()}", pad_id=pad_token_id(tok)
            )
            assert prefix is not None and prefix.split.shares_starts
            prefix.split.shares_starts = condition == "shared start"
            decode.MIN_SHARED_START = SHIPPED_MIN_SHARED_START if condition == "shared start" else 10**9
            step, job = timed_job(bank, tok, tasks, config, prefix, skip=2)
            examples, routes = [], []
            for t in tasks:
                other = (t.slot + 1) % len(tasks)
                for column in ([], [(t.slot, 1.0)], [(t.slot, 0.5), (other, 0.5)]):
                    examples += [*t.train, *t.holdout]
                    routes += [column] * (len(t.train) + len(t.holdout))
            with dense_views(backbone.model, from_layer=0, budget_bytes=dense_budget(bank.device)):
                started = time.perf_counter()
                scored = score_examples(
                    bank, tok, examples, routes, max_seq_len=config.max_seq_len, prefix=prefix
                )
                scoring = time.perf_counter() - started
            specs = answer_specs(tok, tasks)
            with dense_views(backbone.model, from_layer=0, budget_bytes=dense_budget(bank.device)):
                started = time.perf_counter()
                answers = BatchDecoder(backbone.model, bank, tok, device=bank.device).run(specs)
                answering = time.perf_counter() - started
            runs[condition].append((step, job, scoring, answering))
            print(
                f"repeat {repeat + 1}: {condition}: {step:.2f} s/step, job {job:.1f} s, "
                f"scoring {len(examples)} rows {scoring:.1f} s, {len(specs)} answers {answering:.1f} s",
                flush=True,
            )
            if condition == "shared start":  # the same adapters the other way (not timed): equal numbers
                prefix.split.shares_starts = False
                decode.MIN_SHARED_START = 10**9
                with dense_views(backbone.model, from_layer=0, budget_bytes=dense_budget(bank.device)):
                    whole = score_examples(
                        bank, tok, examples, routes, max_seq_len=config.max_seq_len, prefix=prefix
                    )
                    again = BatchDecoder(backbone.model, bank, tok, device=bank.device).run(specs)
                diff = max(abs(a.loss_sum - b.loss_sum) for a, b in zip(scored, whole, strict=True))
                same = sum(a.token_ids == b.token_ids for a, b in zip(answers, again, strict=True))
                print(
                    f"  shared start against whole rows: largest difference of a row's summed loss {diff:.2e}"
                )
                print(f"  answers with the same tokens: {same}/{len(specs)}")
            prefix.split.shares_starts = True
    decode.MIN_SHARED_START = SHIPPED_MIN_SHARED_START
    base = runs["whole rows"]
    print(
        "\n| condition | s/step | speed-up | job s | speed-up | scoring s | speed-up | answers s | speed-up |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for condition, values in runs.items():
        ups = [statistics.median(b[i] / v[i] for b, v in zip(base, values, strict=True)) for i in range(4)]
        meds = [statistics.median(v[i] for v in values) for i in range(4)]
        print(
            f"| {condition} | {meds[0]:.2f} | {ups[0]:.2f}x | {meds[1]:.1f} | {ups[1]:.2f}x | "
            f"{meds[2]:.1f} | {ups[2]:.2f}x | {meds[3]:.1f} | {ups[3]:.2f}x |"
        )


if __name__ == "__main__":
    main()
