"""Benchmarks of the adapter bank against PEFT (not CI): inference, multi-user training, backbone quantisation.

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_bank.py`` (about two minutes on 2 CPU
cores). ``--backbone builtin:smollm2-135m --data-dir DIR`` runs it on SmolLM2-135M-Instruct (converted once into
``DIR/backbones/``) in nf4 instead of the tiny random-init backbones, with smaller sizes (``SMOLLM2_SIZES``; each
can be set by a flag) and one warm-up call per condition instead of one per timed call: aimed at about five
minutes on 2 CPU cores, it took 17 on a heavily shared machine. Every number is a median of ``--runs`` timed
runs, each after an untimed warm-up call; conditions are interleaved run by run so that machine noise hits them
alike, and ratios are medians of per-run ratios. Prints
the markdown tables of tests/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_backbone_options, backbones_to_run, chosen_sizes, median, ratio, timed
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig, SlotPlan, inject_bank
from lorafleet.backbone import load_backbone

RANK, ALPHA, BATCH, SEQ = 16, 32.0, 32, 32
N_ADAPTERS = 32
ROWS_PER_USER = 4
INFER_USERS: tuple[int, ...] = (1, 8, N_ADAPTERS)
TRAIN_USERS: tuple[int, ...] = (1, 4, 16)
#: inference and the PEFT comparison run on this quantisation (training is always nf4)
INFER_QUANTIZATION = "fp32"
#: an untimed warm-up call before every timed call (True), or one per condition before the first round (False)
WARMUP_EACH = True
#: SmolLM2-135M on CPU in nf4: bitsandbytes dequantises every weight on every forward (about 1.3 s for the 30
#: layers here), so batches are small and each condition is warmed up once; medians of 3 interleaved runs.
SMOLLM2_SIZES: dict[str, Any] = {
    "batch": 4,
    "seq": 16,
    "infer_users": "1,4",
    "train_users": "1,4",
    "rows_per_user": 2,
    "runs": 3,
    "parts": "infer,train",
    "infer_quantization": "nf4",
    "warmup": "once",
}
TINY_SIZES: dict[str, Any] = {
    "batch": BATCH,
    "seq": SEQ,
    "infer_users": ",".join(map(str, INFER_USERS)),
    "train_users": ",".join(map(str, TRAIN_USERS)),
    "rows_per_user": ROWS_PER_USER,
    "runs": 5,
    "parts": "infer,train,quant",
    "infer_quantization": INFER_QUANTIZATION,
    "warmup": "each",
}


def lora_flop_share(bank: AdapterBank) -> float:
    """The LoRA branch's share of the adapted layers' FLOPs: sum r(d_in+d_out) / sum d_in*d_out."""
    lora = sum(RANK * (layer.in_features + layer.out_features) for layer in bank.layers.values())
    base = sum(layer.in_features * layer.out_features for layer in bank.layers.values())
    return lora / base


def peft_with_adapters(path: Path, quantization: str, bank: AdapterBank, n: int, **lora: Any) -> PeftModel:
    """A PEFT model with ``n`` adapters ``u0..`` holding the same weights as the bank's slots."""
    model = load_backbone(path, quantization=quantization, device="cpu").model
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", **lora)
    peft_model = get_peft_model(model, config, adapter_name="u0")
    for slot in range(n):
        if slot:
            peft_model.add_adapter(f"u{slot}", config)
        set_peft_model_state_dict(peft_model, bank.slot_state_dict(slot), adapter_name=f"u{slot}")
    return peft_model


# --- 1. inference ------------------------------------------------------------------------------------------
def bench_inference(path: Path, runs: int) -> list[dict[str, Any]]:
    n_adapters = max(INFER_USERS)
    bare = load_backbone(path, quantization=INFER_QUANTIZATION, device="cpu")
    banked = load_backbone(path, quantization=INFER_QUANTIZATION, device="cpu")
    bank = inject_bank(banked, target_modules="all-linear", n_slots=2 * n_adapters, max_rank=RANK)
    for slot in range(2 * n_adapters):  # a full bank: cost must not depend on slots the batch does not use
        bank.load_slot(
            slot,
            random_lora_weights(bank, rank=RANK, seed=slot, scale=0.02),
            SlotConfig(rank=RANK, alpha=ALPHA),
        )
    peft_model = peft_with_adapters(path, INFER_QUANTIZATION, bank, n_adapters).eval()
    ids = torch.randint(3, 259, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))  # [batch, seq]
    conditions: dict[str, Callable[[], Any]] = {
        "no adapter (bare model)": lambda: bare.model(ids),
        "bank, base only": lambda: _bank_forward(bank, banked.model, ids, None),
    }
    for users in INFER_USERS:
        routes = [
            row * users // BATCH for row in range(BATCH)
        ]  # contiguous groups, as a server sorts a batch
        plan = SlotPlan.single(routes)
        names = [f"u{r}" for r in routes]
        conditions[f"bank/{users}"] = lambda plan=plan: _bank_forward(bank, banked.model, ids, plan)
        conditions[f"peft mixed/{users}"] = lambda names=names: peft_model(input_ids=ids, adapter_names=names)
        conditions[f"peft swap/{users}"] = lambda routes=routes: _peft_swap(peft_model, ids, routes)
    with torch.no_grad():
        seconds = timed(conditions, runs, warmup_each=WARMUP_EACH)
    share = lora_flop_share(bank)
    bare_s = seconds["no adapter (bare model)"]
    rows = []
    for users in INFER_USERS:
        ours, mixed, swap = (seconds[f"{k}/{users}"] for k in ("bank", "peft mixed", "peft swap"))
        rows.append(
            {
                "users": users,
                "bank_tok_s": BATCH * SEQ / median(ours),
                "peft_mixed_tok_s": BATCH * SEQ / median(mixed),
                "peft_swap_tok_s": BATCH * SEQ / median(swap),
                "vs_mixed": ratio(mixed, ours),
                "vs_swap": ratio(swap, ours),
                "overhead": ratio(ours, bare_s) - 1,
                "allowed": 2 * share,
            }
        )
    rows.append(
        {
            "bare_tok_s": BATCH * SEQ / median(bare_s),
            "base_only_tok_s": BATCH * SEQ / median(seconds["bank, base only"]),
            "share": share,
        }
    )
    return rows


def _bank_forward(bank: AdapterBank, model: torch.nn.Module, ids: torch.Tensor, plan: SlotPlan | None) -> Any:
    with bank.use(plan):
        return model(ids)


def _peft_swap(peft_model: PeftModel, ids: torch.Tensor, routes: list[int]) -> None:
    for user in sorted(set(routes)):
        peft_model.set_adapter(f"u{user}")
        peft_model(input_ids=ids[[i for i, r in enumerate(routes) if r == user]])


# --- 2. training -------------------------------------------------------------------------------------------
def bench_training(path: Path, runs: int, users: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    users = users or TRAIN_USERS
    k_max = max(users)
    backbone = load_backbone(path, quantization="nf4", device="cpu")
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=k_max, max_rank=RANK)
    for slot in range(k_max):
        bank.init_slot(slot, SlotConfig(rank=RANK, alpha=ALPHA, dropout=0.05), seed=slot)
    peft_model = peft_with_adapters(path, "nf4", bank, k_max, lora_dropout=0.05)
    backbone.model.train()
    peft_model.train()
    data = torch.randint(3, 259, (k_max * ROWS_PER_USER, SEQ), generator=torch.Generator().manual_seed(1))
    rows = []
    for k in users:
        ids = data[: k * ROWS_PER_USER]  # [k * rows_per_user, seq]
        routes = [row // ROWS_PER_USER for row in range(ids.shape[0])]
        bank_opt = torch.optim.AdamW(bank.trainable_parameters(range(k)), lr=1e-4)
        lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        peft_opt = torch.optim.AdamW(lora_params, lr=1e-4)
        seconds = timed(
            {
                "bank": lambda ids=ids, routes=routes, opt=bank_opt: _bank_step(
                    bank, backbone.model, ids, routes, opt
                ),
                "peft": lambda ids=ids, routes=routes, opt=peft_opt: _peft_steps(
                    peft_model, ids, routes, opt
                ),
            },
            runs,
            warmup_each=WARMUP_EACH,
        )
        rows.append(
            {
                "users": k,
                "bank_s": median(seconds["bank"]),
                "peft_s": median(seconds["peft"]),
                "ratio": ratio(seconds["bank"], seconds["peft"]),
            }
        )
        bank.release_parameters()
    return rows


def _per_user_loss(logits: torch.Tensor, ids: torch.Tensor, routes: list[int]) -> torch.Tensor:
    """Sum over users of each user's mean token loss: each adapter gets the gradient of its own step."""
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    per_row = per_token.mean(dim=1)  # [batch]
    route_ids = torch.tensor(routes)
    return sum(per_row[route_ids == u].mean() for u in sorted(set(routes)))  # type: ignore[return-value]


def _bank_step(
    bank: AdapterBank,
    model: torch.nn.Module,
    ids: torch.Tensor,
    routes: list[int],
    optimizer: torch.optim.Optimizer,
) -> None:
    with bank.use(SlotPlan.single(routes)):
        _per_user_loss(model(ids).logits, ids, routes).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _peft_steps(
    peft_model: PeftModel, ids: torch.Tensor, routes: list[int], optimizer: torch.optim.Optimizer
) -> None:
    for user in sorted(set(routes)):
        peft_model.set_adapter(f"u{user}")
        rows = ids[[i for i, r in enumerate(routes) if r == user]]
        _per_user_loss(peft_model(input_ids=rows).logits, rows, [0] * rows.shape[0]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# --- 3. quantisation ---------------------------------------------------------------------------------------
def bench_quantization(path: Path, runs: int) -> list[dict[str, Any]]:
    ids = torch.randint(3, 259, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    models = {q: load_backbone(path, quantization=q, device="cpu") for q in ("fp32", "bf16", "nf4", "int8")}
    with torch.no_grad():
        seconds = timed(
            {q: (lambda b=b: b.model(ids)) for q, b in models.items()}, runs, warmup_each=WARMUP_EACH
        )
    return [
        {
            "quantization": q,
            "latency_ms": 1e3 * median(seconds[q]),
            "vs_fp32": ratio(seconds[q], seconds["fp32"]),
            "memory_mib": b.memory_bytes() / 2**20,
        }
        for q, b in models.items()
    ]


# --- report ------------------------------------------------------------------------------------------------
def report(
    name: str, infer: list[dict[str, Any]], train: list[dict[str, Any]], quant: list[dict[str, Any]]
) -> str:
    lines = [f"### {name}", ""]
    if infer:
        summary = infer[-1]
        lines += [
            f"Inference, batch {BATCH} x {SEQ} tokens, rank {RANK} on all linear layers, {INFER_QUANTIZATION}. "
            "No adapter: "
            f"{summary['bare_tok_s']:.0f} tok/s; bank with base-only plan: {summary['base_only_tok_s']:.0f} tok/s. "
            f"LoRA FLOP share of the adapted layers: {100 * summary['share']:.1f}%.",
            "",
            "| adapters in batch | bank tok/s | PEFT mixed tok/s | PEFT swap tok/s | bank / PEFT mixed | "
            "bank / PEFT swap | overhead vs no adapter (allowed) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['users']} | {r['bank_tok_s']:.0f} | {r['peft_mixed_tok_s']:.0f} | {r['peft_swap_tok_s']:.0f} | "
            f"{r['vs_mixed']:.2f}x | {r['vs_swap']:.2f}x | {100 * r['overhead']:.1f}% ({100 * r['allowed']:.1f}%) |"
            for r in infer[:-1]
        ]
        lines.append("")
    if train:
        lines += [
            f"Training step, nf4 backbone, {ROWS_PER_USER} sequences x {SEQ} tokens per user, AdamW:",
            "",
            "| users K | bank: 1 step (s) | PEFT: K steps (s) | bank / PEFT |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['users']} | {r['bank_s']:.3f} | {r['peft_s']:.3f} | {r['ratio']:.2f}x |" for r in train
        ]
        lines.append("")
    if quant:
        lines += [
            f"Backbone alone, forward of {BATCH} x {SEQ} tokens:",
            "",
            "| quantization | latency (ms) | latency vs fp32 | memory (MiB) |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['quantization']} | {r['latency_ms']:.1f} | {r['vs_fp32']:.2f}x | {r['memory_mib']:.2f} |"
            for r in quant
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_backbone_options(parser)
    parser.add_argument("--runs", type=int, help="timed runs per condition (median reported; 5, SmolLM2: 3)")
    parser.add_argument("--parts", help="infer,train,quant (SmolLM2: infer,train)")
    parser.add_argument("--batch", type=int, help="inference batch (32, SmolLM2: 4)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (32, SmolLM2: 16)")
    parser.add_argument("--infer-users", help="adapters per inference batch (1,8,32, SmolLM2: 1,4)")
    parser.add_argument("--train-users", help="users K per training step (1,4,16, SmolLM2: 1,4)")
    parser.add_argument("--rows-per-user", type=int, help="training sequences per user (4, SmolLM2: 2)")
    parser.add_argument(
        "--infer-quantization", help="quantisation of the inference part (fp32, SmolLM2: nf4)"
    )
    parser.add_argument("--warmup", choices=("each", "once"), help="warm-up before each timed call, or once")
    args = parser.parse_args()
    sizes = chosen_sizes(args, TINY_SIZES, SMOLLM2_SIZES)
    _configure(sizes)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = int(sizes["runs"])
    parts = set(str(sizes["parts"]).split(","))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {runs} runs, sizes {sizes}\n"
    )
    for name, path in backbones_to_run(args):
        started = time.perf_counter()
        infer = bench_inference(path, runs) if "infer" in parts else []
        gc.collect()
        train = bench_training(path, runs) if "train" in parts else []
        gc.collect()
        quant = bench_quantization(path, runs) if "quant" in parts else []
        print(
            report(f"{name} ({_describe(path)}), {time.perf_counter() - started:.0f} s", infer, train, quant)
        )


def _configure(sizes: dict[str, Any]) -> None:
    """Set the module's size constants (the defaults are the tiny benchmark's)."""
    global BATCH, SEQ, INFER_USERS, TRAIN_USERS, ROWS_PER_USER, INFER_QUANTIZATION, WARMUP_EACH
    BATCH, SEQ, ROWS_PER_USER = int(sizes["batch"]), int(sizes["seq"]), int(sizes["rows_per_user"])
    INFER_USERS = tuple(int(u) for u in str(sizes["infer_users"]).split(","))
    TRAIN_USERS = tuple(int(u) for u in str(sizes["train_users"]).split(","))
    INFER_QUANTIZATION = str(sizes["infer_quantization"])
    WARMUP_EACH = sizes["warmup"] == "each"


def _describe(path: Path) -> str:
    c = json.loads((path / "config.json").read_text())
    return f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, ffn {c['intermediate_size']}"


if __name__ == "__main__":
    main()
