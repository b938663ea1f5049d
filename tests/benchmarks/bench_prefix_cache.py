"""Benchmark of prefix caching (not CI): requests that share a long system prompt, with and without the cache.

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_prefix_cache.py`` (the tiny random-init
backbone), or ``--backbone builtin:smollm2-135m --data-dir DIR`` for SmolLM2-135M-Instruct (converted once into
``DIR/backbones/``, nf4 with the dense CPU views, as served; its chat template). Prints a markdown table.

Every request is a support question after the same house instructions (``--system-tokens`` long, the way a
tenant's system prompt is; 0: none, so only the chat template's own start is shared), routed through one adapter (a real PEFT folder, so the cache keys it by its
weights file). Two scenarios, each measured with the cache off and on (warm: an earlier request left the
instructions' blocks), interleaved run by run so machine noise hits both alike:

1. **alone**: a request arrives at an idle engine; its time to first token is its prefill (``DecodeBatch.join``).
2. **joining**: a request joins ``--running`` rows that are decoding (``join_and_step``: on a Llama backbone its
   prefill runs fused into the running rows' step); the time of that step is what the running rows wait.

Figures are medians of ``--runs`` runs; the ratio is off / on. The benchmark also checks that each request's
first tokens are the same with and without the cache.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import TINY_BACKBONE, add_backbone_options, add_int_options, backbones_to_run  # noqa: E402

from lorafleet.adapters import AdapterBank, SlotConfig, inject_bank  # noqa: E402
from lorafleet.adapters.dense import dense_budget, densify  # noqa: E402
from lorafleet.adapters.serialization import load_slot_from_dir, save_slot  # noqa: E402
from lorafleet.backbone import Backbone, load_backbone  # noqa: E402
from lorafleet.serving.decode import DecodeBatch, RowSpec, run_to_end  # noqa: E402
from lorafleet.serving.prefix_cache import PrefixCache  # noqa: E402

INSTRUCTIONS = (
    "You are the support assistant of a bicycle shop. Answer politely and briefly, in plain words, and never "
    "promise a refund before the order number is checked. Offer the repair booking page for any mechanical "
    "fault, and the returns form for anything bought in the last thirty days. "
)
QUESTIONS = [
    "My chain keeps slipping, what should I do?",
    "Can I return a helmet I bought last week?",
    "Do you sell tubes for 28 inch wheels?",
    "How long does a brake service take?",
    "Is there a discount for students?",
    "My order has not arrived yet.",
    "Which lights are legal at night?",
    "Can you fit a child seat to my bike?",
]


def prompt_ids(backbone: Backbone, system_tokens: int, question: str) -> tuple[int, ...]:
    """The house instructions (repeated up to about ``system_tokens`` tokens) and the question, through the chat
    template when the tokenizer has one."""
    tokenizer = backbone.tokenizer
    per = len(tokenizer(INSTRUCTIONS)["input_ids"])
    system = INSTRUCTIONS * round(system_tokens / per)  # 0: none (a chat template adds its default one)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tuple(tokenizer(system + question)["input_ids"])


def adapter_bank(backbone: Backbone, folder: Path) -> AdapterBank:
    """A bank with one random rank-8 adapter on every linear layer, loaded from a PEFT folder (content hash)."""
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=2, max_rank=8)
    bank.init_slot(0, SlotConfig(rank=8, alpha=16), seed=1)
    for layer in bank.layers.values():  # a trained-looking adapter: B non-zero
        lora_a, lora_b = layer.read_slot(0)
        layer.write_slot(0, lora_a, torch.randn_like(lora_b) * 0.02, scaling=2.0, dropout=0.0)
    save_slot(bank, 0, folder)
    bank.evict_slot(0)
    load_slot_from_dir(bank, 0, folder)
    return bank


def run(args: argparse.Namespace, name: str, path: Path) -> list[str]:
    quantization = "fp32" if args.backbone == TINY_BACKBONE else "nf4"  # as bench_continuous: served nf4
    backbone = load_backbone(path, quantization=quantization, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        bank = adapter_bank(backbone, Path(tmp) / "adapter")
    densify(backbone.model, budget_bytes=dense_budget(backbone.device, None))  # as build_engine serves on CPU
    specs = [
        RowSpec(prompt_ids(backbone, args.system_tokens, q), ((0, 1.0),), max_new_tokens=args.new_tokens)
        for q in QUESTIONS
    ]
    long_rows = [
        RowSpec(prompt_ids(backbone, 16, q), ((0, 1.0),), max_new_tokens=10_000)
        for q in QUESTIONS[: args.running]
    ]
    cache = PrefixCache()

    def batch(cached: bool) -> DecodeBatch:
        return DecodeBatch(
            backbone.model,
            bank,
            backbone.tokenizer,
            device=backbone.device,
            prefix_cache=cache if cached else None,
        )

    run_to_end(batch(True), [specs[0]])  # warm: the instructions' blocks are cached
    same = all(
        run_to_end(batch(True), [s])[0].token_ids == run_to_end(batch(False), [s])[0].token_ids
        for s in specs[:3]
    )
    alone: dict[bool, list[float]] = {False: [], True: []}
    joining: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.runs):
        spec = specs[i % len(specs)]
        for cached in (False, True):
            fresh = batch(cached)
            start = time.perf_counter()
            fresh.join([("new", spec)])
            alone[cached].append(time.perf_counter() - start)

            running = batch(cached)
            running.join(list(enumerate(long_rows)))
            running.step()
            start = time.perf_counter()
            running.join_and_step([("new", spec)])
            joining[cached].append(time.perf_counter() - start)
    rows = []
    for scenario, samples in (
        ("alone (time to first token)", alone),
        ("joining a running batch (that step)", joining),
    ):
        off, on = statistics.median(samples[False]), statistics.median(samples[True])
        rows.append(
            f"| {name} | {scenario} | {len(specs[1].prompt_ids)} | {off * 1000:.1f} | {on * 1000:.1f} | "
            f"{off / on:.2f}x | {'yes' if same else 'NO'} |"
        )
    logging.info(
        "%s: cache %d blocks, %.1f MiB, hit rate %.2f",
        name,
        len(cache),
        cache.nbytes / 2**20,
        cache.stats.hit_rate,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_options(parser)
    add_int_options(parser, system_tokens=256, new_tokens=4, running=8, runs=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("| backbone | scenario | prompt tokens | ms, cache off | ms, cache on | off / on | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, path in backbones_to_run(args):
        for row in run(args, name, path):
            print(row, flush=True)


if __name__ == "__main__":
    main()
