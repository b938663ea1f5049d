"""Dense views in serving: a decoding step through the engine with the 4-bit layers' dense copies, against the same
engine dequantising every weight at every call (what bitsandbytes does on CPU).

One engine as ``bench_continuous`` builds it (``USERS`` users, each a rank-16 all-linear adapter), ``rows``
requests of distinct users decoding in one ``DecodeBatch``: the prefill of their prompts, then the median time of a
step. The two arms alternate in one process (``adapters.dense.densify`` for one arm, ``dense_views`` restored after
it: the same weights), ``--runs`` times each; the table gives the medians and their ratio.

    .venv/bin/python tests/benchmarks/bench_dense_serving.py --data-dir DIR   # SmolLM2-135M nf4, about 2 minutes
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_continuous import build, prompts

from lorafleet.adapters.dense import dense_views
from lorafleet.backbone import resolve_backbone_path
from lorafleet.serving import GenerationEngine, GenerationRequest


def one_run(engine: GenerationEngine, texts: Sequence[str], rows: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, median step seconds) of ``rows`` requests of distinct users decoding together."""
    requests = [
        GenerationRequest(tenant_id=1, user=f"user-{i}", prompt=texts[i], raw=True, max_new_tokens=steps + 8)
        for i in range(rows)
    ]
    admitted = engine.admit(requests)
    batch = engine.decode_batch()
    try:
        with engine.model_lock:
            started = time.perf_counter()
            batch.join([(i, a.spec) for i, a in enumerate(admitted) if not isinstance(a, Exception)])
            prefill = time.perf_counter() - started
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                batch.step()
                times.append(time.perf_counter() - started)
    finally:
        for a in admitted:
            if not isinstance(a, Exception):
                a.release()
    return prefill, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decoding steps timed per run")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    path = resolve_backbone_path(args.backbone, data_dir=args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        backbone, engine = build(path, "nf4", Path(tmp) / "blobs", dense_mb=0)  # the 4-bit layers as loaded
        rows_list = [int(r) for r in args.rows.split(",")]
        texts = prompts(backbone, max(rows_list), args.prompt_tokens)
        one_run(engine, texts, 1, 2)  # warm-up: the adapters' first loads into their slots
        samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            for rows in rows_list:
                samples.setdefault(("4-bit", rows), []).append(one_run(engine, texts, rows, args.steps))
                with dense_views(backbone.model, from_layer=0, budget_bytes=1 << 30):
                    samples.setdefault(("dense", rows), []).append(one_run(engine, texts, rows, args.steps))
    print(
        f"{args.backbone} nf4, {args.threads} thread(s), {args.prompt_tokens}-token prompts, medians of {args.runs} "
        f"runs of {args.steps} steps\n"
    )
    print(
        "| rows | step, 4-bit (ms) | step, dense (ms) | step speed-up | prefill, 4-bit (ms) | prefill, dense (ms) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for rows in rows_list:
        four = samples[("4-bit", rows)]
        dense = samples[("dense", rows)]
        step4, stepd = statistics.median(s for _, s in four), statistics.median(s for _, s in dense)
        pre4, pred = statistics.median(p for p, _ in four), statistics.median(p for p, _ in dense)
        print(
            f"| {rows} | {1000 * step4:.0f} | {1000 * stepd:.0f} | {step4 / stepd:.2f}x | {1000 * pre4:.0f} | "
            f"{1000 * pred:.0f} |"
        )


if __name__ == "__main__":
    main()
