"""Benchmarks of the bank's decode cost and adapter memory (issue 17, item 6; not CI).

Run from the repository root (about 6 minutes on 2 CPU cores with the defaults)::

    .venv/bin/python tests/benchmarks/bench_decode.py --data-dir /tmp/lf-data

1. **Decode**: greedy decoding of a batch of ``--batch`` rows, each through its own adapter (16 distinct rank-16
   adapters on all linear layers), on SmolLM2-135M-Instruct in nf4 (``--backbone``, ``--quantization``). The
   baseline is Hugging Face ``generate`` on a bare copy of the backbone (no bank) with the same prompts and
   ``min_new_tokens = max_new_tokens``. Conditions, interleaved, medians of ``--runs`` runs after one warm-up:
   ``generate`` under the bank's routing plan; the same with the gathered rows dropped before every forward (the
   per-step re-gathering this item removed; the bucketed layout is kept); and the serving decode loop
   (``serving.decode.BatchDecoder``, which rebuilds its plan from the rows' routes at every step). Ratios are
   medians of per-run ratios against the bare ``generate`` of the same round.
2. **Memory**: bytes of the bank's slot stacks (16 slots, rank 16, all linear layers) in fp32 and in bf16 (the
   CUDA serving dtype), against the backbone's own weights.
3. **Hit rate**: 1,000 users with one real version each (rank-1 single-layer adapters on the tiny backbone, so
   misses stay cheap), 20,000 requests from Zipf(s) over users, a 64-slot cache with a host tier of
   ``--host-adapters`` versions (and without one, for reference); the first 10 % of requests are warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_int_options
from bench_serving import evict_all, replay, write_versions, zipf_draws
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig, inject_bank
from lorafleet.adapters.plan import SlotPlan
from lorafleet.backbone import build_tiny_backbone, load_backbone, resolve_backbone_path
from lorafleet.serving import AdapterCache
from lorafleet.serving.decode import BatchDecoder, RowSpec
from lorafleet.store.blob import open_blob_store

RANK = 16


def _random_adapters(bank: AdapterBank, n: int, rank: int) -> None:
    for slot in range(n):
        tensors = random_lora_weights(bank, rank=rank, seed=slot, scale=0.02)
        bank.load_slot(slot, tensors, SlotConfig(rank=rank, alpha=2.0 * rank))


# --- 1. decode -----------------------------------------------------------------------------------------------
def bench_decode(
    path: Path, *, quantization: str, batch: int, prompt: int, new: int, runs: int
) -> dict[str, Any]:
    bare = load_backbone(path, quantization=quantization, device="cpu")
    served = load_backbone(path, quantization=quantization, device="cpu")
    bank = inject_bank(served, n_slots=batch, max_rank=RANK)
    _random_adapters(bank, batch, RANK)
    ids = torch.randint(100, 5000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    options = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    plan = SlotPlan.single(list(range(batch)))
    decoder = BatchDecoder(served.model, bank, served.tokenizer, device=served.device)
    rows = [RowSpec(tuple(ids[i].tolist()), ((i, 1.0),), max_new_tokens=new) for i in range(batch)]
    tokens: dict[str, int] = {}

    def run_bare() -> None:
        tokens["bare generate"] = int(
            bare.model.generate(input_ids=ids, attention_mask=mask, **options).shape[1]
        )

    def run_bank() -> None:
        with bank.use(plan):
            tokens["bank generate"] = int(
                served.model.generate(input_ids=ids, attention_mask=mask, **options).shape[1]
            )

    def run_regather() -> None:
        hook = served.model.register_forward_pre_hook(lambda *_: bank.drop_cached_work())
        try:
            with bank.use(plan):
                served.model.generate(input_ids=ids, attention_mask=mask, **options)
        finally:
            hook.remove()

    def run_decoder() -> None:
        tokens["decoder"] = sum(len(o.token_ids) for o in decoder.run(rows))

    conditions: dict[str, Callable[[], None]] = {
        "bare generate": run_bare,
        "bank generate, rows reused": run_bank,
        "bank generate, re-gathered every forward": run_regather,
        "serving decode loop (plan rebuilt each step)": run_decoder,
    }
    for fn in conditions.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(runs):
        for name, fn in conditions.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    base = seconds["bare generate"]
    decoder_tokens = tokens["decoder"]
    return {
        "rows": {
            name: {
                "seconds": statistics.median(s),
                "vs_bare": statistics.median(b / x for b, x in zip(base, s, strict=True)),
            }
            for name, s in seconds.items()
        },
        "decoder_tokens": decoder_tokens,
        "tokens": batch * new,
    }


# --- 2. memory -----------------------------------------------------------------------------------------------
def bench_memory(path: Path, *, quantization: str, slots: int) -> dict[str, float]:
    mib = 1 << 20
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        backbone = load_backbone(path, quantization=quantization, device="cpu")
        out["backbone"] = backbone.memory_bytes() / mib
        out[name] = inject_bank(backbone, n_slots=slots, max_rank=RANK, dtype=dtype).nbytes / mib
    return out


# --- 3. hit rate ---------------------------------------------------------------------------------------------
def bench_hits(
    data_dir: Path, *, users: int, slots: int, host: int, requests: int, exponents: tuple[float, ...]
) -> list[dict[str, Any]]:
    backbone = load_backbone(build_tiny_backbone(data_dir), quantization="fp32", device="cpu")
    bank = inject_bank(backbone, n_slots=slots + 1, max_rank=4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_blob_store((Path(tmp) / "blobs").as_uri())
        members = write_versions(bank, store, users, rank=1, modules=[sorted(bank.layers)[0]])
        for s in exponents:
            _weights, draws = zipf_draws(users, requests, s)
            for host_entries in (0, host):
                cache = AdapterCache.from_blob_store(
                    bank, store, slots=range(1, slots + 1), host_entries=host_entries
                )
                before, after = replay(cache, members, draws)
                total = requests - requests // 10
                slot_hits = after.hits + after.coalesced - before.hits - before.coalesced
                host_hits = after.host_hits - before.host_hits
                rows.append(
                    {
                        "zipf_s": s,
                        "host": host_entries,
                        "slot_hit_rate": slot_hits / total,
                        "hit_rate": (slot_hits + host_hits) / total,
                        "store_reads": (after.misses - after.host_hits) - (before.misses - before.host_hits),
                        "host_mib": after.host_bytes / (1 << 20),
                    }
                )
                evict_all(bank, range(1, slots + 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path(".lorafleet"))
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--parts", default="decode,memory,hits")
    parser.add_argument("--batch", type=int, default=16, help="rows, each with its own adapter")
    add_int_options(
        parser, prompt_tokens=8, new_tokens=8, runs=5, threads=1, requests=20_000, host_adapters=1000
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, args {vars(args)}\n")
    if "decode" in parts or "memory" in parts:
        path = resolve_backbone_path(args.backbone, data_dir=args.data_dir)
    if "decode" in parts:
        result = bench_decode(
            path,
            quantization=args.quantization,
            batch=args.batch,
            prompt=args.prompt_tokens,
            new=args.new_tokens,
            runs=args.runs,
        )
        print(
            f"Decode, {args.batch} rows x {args.new_tokens} greedy tokens ({args.prompt_tokens}-token prompts), "
            f"{args.batch} distinct rank-{RANK} all-linear adapters, {args.quantization}, median of {args.runs}:\n"
        )
        print("| condition | seconds per batch | throughput vs bare generate |\n| --- | --- | --- |")
        for name, r in result["rows"].items():
            print(f"| {name} | {r['seconds']:.3f} | {r['vs_bare']:.2f}x |")
        print(
            f"\nThe decode loop generated {result['decoder_tokens']} of {result['tokens']} tokens (it stops at eos).\n"
        )
    if "memory" in parts:
        m = bench_memory(path, quantization=args.quantization, slots=16)
        print(
            f"Memory: 16 slots of rank {RANK} on all linear layers: fp32 {m['fp32']:.1f} MiB, bf16 {m['bf16']:.1f} "
            f"MiB; the {args.quantization} backbone itself {m['backbone']:.1f} MiB.\n"
        )
    if "hits" in parts:
        rows = bench_hits(
            args.data_dir,
            users=1000,
            slots=64,
            host=args.host_adapters,
            requests=args.requests,
            exponents=(0.8, 1.1, 1.3),
        )
        print(f"Hit rate, 1,000 users, 64 slots, {args.requests:,} requests (first 10% warm-up):\n")
        print("| Zipf s | host tier | slot hit rate | hit rate (slot or host) | store reads | host MiB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['zipf_s']} | {r['host']:,} | {100 * r['slot_hit_rate']:.1f}% | {100 * r['hit_rate']:.1f}% "
                f"| {r['store_reads']:,} | {r['host_mib']:.1f} |"
            )


if __name__ == "__main__":
    main()
