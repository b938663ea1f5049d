"""Benchmarks of serving (not CI): generation throughput across users, cold loads from S3, cache hit rate.

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_serving.py --threads 1`` (about 10
minutes on 2 CPU cores). Prints the markdown tables of tests/benchmarks/README.md ("Serving").
``--backbone builtin:smollm2-135m --data-dir DIR`` runs throughput and cold loads on SmolLM2-135M-Instruct (converted
once into ``DIR/backbones/``) in nf4 instead of the tiny random-init backbones, with smaller sizes so that it
finishes in about five minutes on 2 CPU cores (``SMOLLM2_SIZES``; each can be set by a flag). Its prompts are raw
(no chat template, as for the bare reference), random lowercase words of at least ``--prompt-tokens`` tokens.

1. Throughput: a batch of 32 greedy requests (32-token prompts, 32 new tokens) spread over 1, 8 or 32 users,
   each user with one rank-16 adapter on all linear layers, through the whole engine (bank resolution, pooled
   embeddings, the routing package's gate, cache leases, decoding). The reference is the same decode loop on
   the bare backbone (no bank at all); "engine, no adapters" is the engine with users that have none. Medians
   of ``--runs`` interleaved runs, each after an untimed warm-up; ratios are medians of per-run ratios.
2. Cold load: a version's first use, from S3 (moto's server on 127.0.0.1) and from a local directory: verified
   download, unpack, file checks, and the write into a bank slot.
3. Hit rate: 1,000 users, one version each (distinct real blobs in a local store), requests drawn from a Zipf
   distribution over users, through a 64-slot cache (real loads on each miss).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    TINY_BACKBONE,
    add_backbone_options,
    backbones_to_run,
    chosen_sizes,
    median,
    ratio,
    timed,
    word_prompts,
)
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig, inject_bank, save_slot
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone
from lorafleet.registry import pack_adapter_archive
from lorafleet.registry.peft_format import inspect_adapter_dir
from lorafleet.routing.embeddings import pooled_embeddings
from lorafleet.routing.experts import Expert, ExpertSet
from lorafleet.routing.spec import GateSpec
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationRequest
from lorafleet.serving.decode import BatchDecoder, RowSpec, left_pad
from lorafleet.store.blob import BlobStore, open_blob_store

RANK, ALPHA, BATCH, PROMPT_TOKENS, NEW_TOKENS = 16, 32.0, 32, 32, 32
USER_COUNTS: tuple[int, ...] = (1, 8, 32)
#: an untimed warm-up call before every timed call (True), or one per condition before the first round (False)
WARMUP_EACH = True
#: the quantisation of the throughput and cold-load backbones
QUANTIZATION = "fp32"
#: prompts fed without the chat template (SmolLM2 has one; the tiny byte-level tokenizer's prompts stay as they were)
RAW_PROMPTS = False
COLD_LOADS = 20
#: SmolLM2-135M on CPU in nf4: bitsandbytes dequantises every weight on every forward, so one decoding step of
#: the 30 layers costs over a second here whatever the batch; a small batch, few steps, one warm-up per condition.
SMOLLM2_SIZES: dict[str, Any] = {
    "batch": 4,
    "prompt_tokens": 8,
    "new_tokens": 4,
    "user_counts": "1,4",
    "runs": 3,
    "parts": "throughput,cold",
    "adapters": "all-linear:16",
    "quantization": "nf4",
    "warmup": "once",
    "cold_loads": 3,
}
TINY_SIZES: dict[str, Any] = {
    "batch": BATCH,
    "prompt_tokens": PROMPT_TOKENS,
    "new_tokens": NEW_TOKENS,
    "user_counts": ",".join(map(str, USER_COUNTS)),
    "runs": 5,
    "parts": "throughput,cold,hits",
    "adapters": "all-linear:16,q_proj+v_proj:8",
    "quantization": QUANTIZATION,
    "warmup": "each",
    "cold_loads": COLD_LOADS,
}


# --- adapters as real blobs ----------------------------------------------------------------------------------
def write_versions(
    bank: AdapterBank, store: BlobStore, n: int, *, rank: int, modules: list[str] | None = None
) -> list[Expert]:
    """``n`` random adapters written as PEFT folders through slot 0, archived and put in ``store``."""
    members = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            tensors = random_lora_weights(bank, rank=rank, seed=i, scale=0.02, modules=modules)
            bank.load_slot(0, tensors, SlotConfig(rank=rank, alpha=2.0 * rank), replace=True)
            folder = save_slot(bank, 0, Path(tmp) / f"a{i}").directory
            ref = store.put_file(
                pack_adapter_archive(files=inspect_adapter_dir(folder), dest=Path(tmp) / f"a{i}.tar")
            )
            members.append(_member(i, ref.sha256, ref.size, rank, _unit_vector(i, bank)))
        bank.evict_slot(0)
    return members


def _unit_vector(seed: int, bank: AdapterBank) -> tuple[float, ...]:
    """A random routing key (the centroid gate scores prompts against it, as for a trained version)."""
    hidden = int(bank.model.config.hidden_size)
    key = torch.nn.functional.normalize(
        torch.randn(hidden, generator=torch.Generator().manual_seed(seed)), dim=0
    )
    return tuple(key.tolist())


def _member(i: int, sha256: str, size: int, rank: int, key: tuple[float, ...]) -> Expert:
    return Expert(
        adapter_id=i + 1,
        adapter_name=f"user-{i}",
        kind="personal",
        version_id=i + 1,
        version_number=1,
        sha256=sha256,
        size_bytes=size,
        rank=rank,
        routing_key=key,
    )


def _bank(user: str, members: list[Expert]) -> ExpertSet:
    return ExpertSet(1, None, user, tuple(members), GateSpec(), f"rev-{user}")


# --- 1. throughput -------------------------------------------------------------------------------------------
def bench_throughput(path: Path, runs: int, store: BlobStore, *, rank: int, targets: str) -> dict[str, Any]:
    """``targets``: "all-linear" or leaf names joined by "+" (e.g. "q_proj+v_proj")."""
    bare = load_backbone(path, quantization=QUANTIZATION, device="cpu")
    backbone = load_backbone(path, quantization=QUANTIZATION, device="cpu")
    bank: AdapterBank | None = None
    if QUANTIZATION == "fp32":
        author = inject_bank(load_backbone(path, quantization="fp32", device="cpu"), n_slots=1, max_rank=RANK)
    else:  # a quantised (SmolLM2) load takes 20 s here: the versions are written through the serving bank
        author = bank = inject_bank(
            backbone, target_modules="all-linear", n_slots=2 * max(USER_COUNTS), max_rank=RANK
        )
    modules = (
        None
        if targets == "all-linear"
        else [m for m in author.layers if m.rsplit(".", 1)[-1] in targets.split("+")]
    )
    members = write_versions(author, store, max(USER_COUNTS), rank=rank, modules=modules)
    if bank is None:
        bank = inject_bank(backbone, target_modules="all-linear", n_slots=2 * max(USER_COUNTS), max_rank=RANK)
    banks = {f"user-{i}": _bank(f"user-{i}", [m]) for i, m in enumerate(members)}
    banks.update({f"base-{i}": _bank(f"base-{i}", []) for i in range(BATCH)})
    cache = AdapterCache.from_blob_store(bank, store)
    engine = GenerationEngine(backbone, bank, cache, resolve_bank=lambda t, u: banks[u])
    prompts = _prompts(bare)
    if RAW_PROMPTS:
        lengths = [len(bare.tokenizer(p)["input_ids"]) for p in prompts]
        print(f"prompt tokens: {min(lengths)}-{max(lengths)}, mean {statistics.mean(lengths):.1f}")
    decoder = BatchDecoder(bare.model, None, bare.tokenizer, device=bare.device)
    rows = [
        RowSpec(prompt_ids=tuple(bare.tokenizer(p)["input_ids"]), routes=(), max_new_tokens=NEW_TOKENS)
        for p in prompts
    ]
    tokens: dict[str, int] = {}

    def run_engine(name: str, users: list[str]) -> Callable[[], None]:
        requests = [
            GenerationRequest(tenant_id=1, user=u, prompt=p, max_new_tokens=NEW_TOKENS, raw=RAW_PROMPTS)
            for u, p in zip(users, prompts, strict=True)
        ]

        def run() -> None:
            tokens[name] = sum(r.completion_tokens for r in engine.generate(requests))

        return run

    def run_bare() -> None:
        tokens["bare"] = sum(len(o.token_ids) for o in decoder.run(rows))

    conditions: dict[str, Callable[[], None]] = {
        "bare": run_bare,
        "engine, no adapters": run_engine("engine, no adapters", [f"base-{i}" for i in range(BATCH)]),
    }
    for n in USER_COUNTS:
        users = [f"user-{row * n // BATCH}" for row in range(BATCH)]
        conditions[f"engine, {n} users"] = run_engine(f"engine, {n} users", users)
    ids, mask = left_pad([r.prompt_ids for r in rows], pad_id=0, device=backbone.device)
    conditions["gate embeddings alone"] = lambda: _embed(backbone, bank, ids, mask)
    seconds = timed(conditions, runs, warmup_each=WARMUP_EACH)
    return {
        name: {
            "seconds": median(s),
            "tok_s": tokens[name] / median(s) if name in tokens else None,
            "tokens": tokens.get(name),
            "vs_bare": ratio(seconds["bare"], s),
        }
        for name, s in seconds.items()
    }


def _embed(backbone: Backbone, bank: AdapterBank, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.inference_mode():
        pooled_embeddings(backbone, bank, ids, mask)


def _prompts(backbone: Backbone) -> list[str]:
    """``BATCH`` distinct printable prompts of ``PROMPT_TOKENS`` bytes (byte-level tokenizer: one token each).

    With ``RAW_PROMPTS`` (a real BPE tokenizer): random lowercase words, added until the prompt has at least
    ``PROMPT_TOKENS`` tokens."""
    rng = np.random.default_rng(0)
    if RAW_PROMPTS:
        return word_prompts(backbone.tokenizer, BATCH, PROMPT_TOKENS, rng)
    return ["".join(chr(int(c)) for c in rng.integers(97, 123, PROMPT_TOKENS)) for _ in range(BATCH)]


# --- 2. cold loads -------------------------------------------------------------------------------------------
def bench_cold_load(path: Path, n: int, stores: dict[str, BlobStore]) -> list[dict[str, Any]]:
    backbone = load_backbone(path, quantization=QUANTIZATION, device="cpu")
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=n + 1, max_rank=RANK)
    rows = []
    for store_name, store in stores.items():
        members = write_versions(bank, store, n, rank=RANK)
        cache = AdapterCache.from_blob_store(bank, store, slots=range(1, n + 1))
        for m in members:
            cache.acquire([m]).release()
        loads = [1e3 * s for s in cache.stats().load_seconds]
        rows.append(
            {
                "store": store_name,
                "size_kib": members[0].size_bytes / 1024,
                "median_ms": statistics.median(loads),
                "p95_ms": float(np.percentile(loads, 95)),
                "n": len(loads),
            }
        )
        evict_all(bank, range(1, n + 1))
    return rows


# --- 3. hit rate ---------------------------------------------------------------------------------------------
def bench_hit_rate(
    path: Path, store: BlobStore, *, users: int, slots: int, requests: int, exponents: tuple[float, ...]
) -> list[dict[str, Any]]:
    backbone = load_backbone(path, quantization="fp32", device="cpu")
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=slots + 1, max_rank=4)
    module = sorted(bank.layers)[0]  # small real adapters: rank 1 on one layer, so loads stay cheap
    members = write_versions(bank, store, users, rank=1, modules=[module])
    rows = []
    for s in exponents:
        weights, draws = zipf_draws(users, requests, s)
        cache = AdapterCache.from_blob_store(bank, store, slots=range(1, slots + 1))
        before, after = replay(cache, members, draws)
        steady = _hits(after) - _hits(before)
        total = requests - requests // 10
        ideal = float(np.sort(weights)[::-1][:slots].sum() / weights.sum())
        rows.append(
            {
                "zipf_s": s,
                "hit_rate": steady / total,
                "ideal": ideal,
                "loads": after.loads,
                "evictions": after.evictions,
                "load_ms": 1e3 * statistics.median(after.load_seconds),
            }
        )
        evict_all(bank, range(1, slots + 1))
    return rows


def zipf_draws(users: int, requests: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Zipf weights (exponent ``s``) over ``users``, and ``requests`` user indexes drawn from them (seeded)."""
    weights = 1.0 / np.arange(1, users + 1) ** s
    return weights, np.random.default_rng(1).choice(users, size=requests, p=weights / weights.sum())


def replay(cache: AdapterCache, members: Sequence[Expert], draws: np.ndarray) -> tuple[Any, Any]:
    """Acquire and release each drawn user's version in turn; the cache's stats after the first tenth of the
    requests (the warm-up) and at the end."""
    warm = len(draws) // 10
    for i, user in enumerate(draws):
        if i == warm:
            before = cache.stats()
        cache.acquire([members[int(user)]]).release()
    return before, cache.stats()


def evict_all(bank: AdapterBank, slots: Iterable[int]) -> None:
    """Empty the bank's ``slots`` that hold an adapter."""
    for slot in slots:
        if bank.slot_info(slot) is not None:
            bank.evict_slot(slot)


def _hits(stats: Any) -> int:
    return int(stats.hits + stats.coalesced)


# --- stores --------------------------------------------------------------------------------------------------
class MotoS3:
    """moto's S3 server on 127.0.0.1 (a random port) with one bucket."""

    def __enter__(self) -> MotoS3:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
        for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
            os.environ.setdefault(key, value)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=self.bucket
        )
        return self

    def store(self) -> BlobStore:
        return open_blob_store(f"s3://{self.bucket}/adapters", endpoint_url=self.endpoint, region="us-east-1")

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


# --- report --------------------------------------------------------------------------------------------------
def report_throughput(name: str, adapters: str, result: dict[str, Any]) -> str:
    lines = [
        f"**{name}**, adapters rank {adapters}: batch {BATCH}, {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new "
        f"tokens, greedy, {QUANTIZATION}{', raw prompts' if RAW_PROMPTS else ''}.",
        "",
        "| condition | seconds per batch | tokens/s | throughput vs bare model |",
        "| --- | --- | --- | --- |",
    ]
    for cond, r in result.items():
        tok_s = "-" if r["tok_s"] is None else f"{r['tok_s']:,.0f}"
        vs = "-" if r["tok_s"] is None else f"{r['vs_bare']:.2f}x"
        lines.append(f"| {cond} | {r['seconds']:.3f} | {tok_s} | {vs} |")
    if RAW_PROMPTS:  # a real model may stop a row early (end of turn): the tokens each batch generated
        counts = ", ".join(f"{cond} {r['tokens']}" for cond, r in result.items() if r["tokens"] is not None)
        lines += ["", f"Tokens generated per batch: {counts}."]
    return "\n".join(lines) + "\n"


def report_cold(rows: list[dict[str, Any]], name: str) -> str:
    lines = [
        f"Cold load of one version ({name} backbone, rank {RANK}, all linear layers):",
        "",
        "| store | archive (KiB) | median (ms) | p95 (ms) | loads |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['store']} | {r['size_kib']:,.0f} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['n']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def report_hits(rows: list[dict[str, Any]], users: int, slots: int, requests: int) -> str:
    lines = [
        f"Hit rate, {users} users (one version each), {slots}-slot cache, {requests:,} requests (first 10% warm-up):",
        "",
        "| Zipf s | hit rate | best static top-{slots} | loads | evictions | median load (ms) |".replace(
            "{slots}", str(slots)
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['zipf_s']} | {100 * r['hit_rate']:.1f}% | {100 * r['ideal']:.1f}% | {r['loads']:,} | {r['evictions']:,} | {r['load_ms']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_backbone_options(parser)
    parser.add_argument("--runs", type=int, help="timed runs per condition (5, SmolLM2: 3)")
    parser.add_argument("--parts", help="throughput,cold,hits (SmolLM2: throughput,cold)")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument(
        "--adapters", help="adapter shapes for throughput: targets:rank,... (SmolLM2: all-linear:16)"
    )
    parser.add_argument("--batch", type=int, help="requests per batch (32, SmolLM2: 4)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt tokens (32, SmolLM2: at least 8)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per request (32, SmolLM2: 4)")
    parser.add_argument("--user-counts", help="users per batch (1,8,32, SmolLM2: 1,4)")
    parser.add_argument("--quantization", help="backbone quantisation (fp32, SmolLM2: nf4)")
    parser.add_argument("--warmup", choices=("each", "once"), help="warm-up before each timed call, or once")
    parser.add_argument("--cold-loads", type=int, help="cold loads per store (20, SmolLM2: 3)")
    args = parser.parse_args()
    tiny = args.backbone == TINY_BACKBONE
    sizes = chosen_sizes(args, TINY_SIZES, SMOLLM2_SIZES)
    _configure(sizes, raw_prompts=not tiny)
    torch.set_num_threads(args.threads)
    runs = int(sizes["runs"])
    parts = set(str(sizes["parts"]).split(","))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {runs} runs, sizes {sizes}\n"
    )
    with MotoS3() as s3, tempfile.TemporaryDirectory() as tmp:
        local = open_blob_store((Path(tmp) / "blobs").as_uri())
        for name, path in backbones_to_run(args):
            if "throughput" in parts:
                for spec in str(sizes["adapters"]).split(","):
                    targets, rank = spec.split(":")
                    result = bench_throughput(path, runs, local, rank=int(rank), targets=targets)
                    print(report_throughput(name, f"{rank} on {targets}", result))
                    gc.collect()
                gc.collect()
            if "cold" in parts:
                print(
                    report_cold(
                        bench_cold_load(
                            path, COLD_LOADS, {"S3 (moto, HTTP)": s3.store(), "local directory": local}
                        ),
                        name,
                    )
                )
        if "hits" in parts:
            path = build_tiny_backbone(args.data_dir)
            rows = bench_hit_rate(
                path, local, users=1000, slots=64, requests=args.requests, exponents=(0.8, 1.1, 1.3)
            )
            print(report_hits(rows, 1000, 64, args.requests))


def _configure(sizes: dict[str, Any], *, raw_prompts: bool) -> None:
    """Set the module's size constants (the defaults are the tiny benchmark's)."""
    global BATCH, PROMPT_TOKENS, NEW_TOKENS, USER_COUNTS, QUANTIZATION, WARMUP_EACH, RAW_PROMPTS, COLD_LOADS
    BATCH, PROMPT_TOKENS, NEW_TOKENS = (
        int(sizes["batch"]),
        int(sizes["prompt_tokens"]),
        int(sizes["new_tokens"]),
    )
    USER_COUNTS = tuple(int(u) for u in str(sizes["user_counts"]).split(","))
    QUANTIZATION, WARMUP_EACH = str(sizes["quantization"]), sizes["warmup"] == "each"
    RAW_PROMPTS, COLD_LOADS = raw_prompts, int(sizes["cold_loads"])


if __name__ == "__main__":
    main()
