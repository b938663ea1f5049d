"""Routing on the real backbone: the centroid gate over a three-task bank on SmolLM2-135M-Instruct embeddings.

Three task adapters (``lorafleet.training.synthetic_routing``: pig latin, reversal, favourites; rank 8 on the top N
layers, prompts rendered with the chat template) are trained in one ``train_slots`` job with the frozen-prefix
cache. Each held-out prompt is embedded by the base model (``embed_prompts``: pooled last hidden state of the
user's own text) and routed by the centroid gate over the three routing keys (the mean embedding of each task's
training prompts). Reported: routing accuracy (the heaviest route is the prompt's own task), and the holdout loss
(teacher-forced) of the gated mixture against the oracle (the right adapter alone), uniform averaging and the
base; on held-out prompts of the training phrasings and of phrasings never seen in training.

Run from the repository root (about 5-10 minutes on 2 busy cores):

    .venv/bin/python tests/benchmarks/bench_routing_real.py
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_quality_real import top_layers_regex  # noqa: E402
from bench_routing import report as routing_report  # noqa: E402
from bench_routing import user_bank_of  # noqa: E402
from quality_real_eval import dequantize_once  # noqa: E402

from lorafleet.adapters import AdapterBank, inject_bank  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.backbone import Backbone, load_backbone  # noqa: E402
from lorafleet.routing.embeddings import common_direction, embed_prompts, routing_key  # noqa: E402
from lorafleet.routing.gates import CentroidGate, Gate  # noqa: E402
from lorafleet.training import Example, SlotTraining, TrainingConfig, train_slots  # noqa: E402
from lorafleet.training.dataset import pad_token_id  # noqa: E402
from lorafleet.training.general_prompts import ANCHOR_PROMPTS  # noqa: E402
from lorafleet.training.synthetic_routing import TASKS, three_tasks  # noqa: E402

Split = dict[str, tuple[list[Example], list[Example]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=".lorafleet")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--train", type=int, default=64, help="training examples per task")
    parser.add_argument("--holdout", type=int, default=32, help="held-out examples per task")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def train_bank(backbone: Backbone, data: Split, args: argparse.Namespace) -> AdapterBank:
    """Slot i = an adapter trained on task i, all three in one job."""
    layers = int(backbone.model.config.num_hidden_layers)
    bank = inject_bank(backbone, target_modules=top_layers_regex(layers, args.layers), n_slots=3, max_rank=8)
    config = TrainingConfig(
        layers=f"top {args.layers}",
        learning_rate=args.lr,
        max_steps=args.steps,
        anchor_ratio=0.0,
        max_seq_len=128,
    )
    tasks = []
    for slot, task in enumerate(TASKS):
        bank.init_slot(slot, config.slot_config(layer_names=list(bank.layers), name=task), seed=slot)
        tasks.append(SlotTraining(slot, task, data[task][0], data[task][1]))
    prefix = FrozenPrefix.for_bank(
        bank, identity="bench-routing-real", pad_id=pad_token_id(backbone.tokenizer)
    )
    started = time.perf_counter()
    for result in train_slots(bank, backbone.tokenizer, tasks, config, prefix=prefix):
        m = result.metrics
        print(f"  {result.key}: holdout loss {m['holdout_loss_before']:.3f} -> {m['holdout_loss_after']:.3f}")
    print(f"  trained in {time.perf_counter() - started:.0f} s")
    return bank


def report(
    title: str, backbone: Backbone, bank: AdapterBank, gates: dict[str, Gate], split: Split, keys: list
) -> None:
    """Routing accuracy and gated loss of each gate on one holdout, against oracle, uniform and base."""
    routing_report(
        title,
        backbone=backbone,
        bank=bank,
        user_bank=user_bank_of(keys),
        gates=gates,
        split=split,
        loss_label="Loss",
        vs_uniform=False,
    )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    backbone = load_backbone("builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=args.data_dir)
    dequantize_once(backbone.model)
    data = three_tasks(n_train=args.train, n_holdout=args.holdout)
    unseen = three_tasks(n_train=args.train, n_holdout=args.holdout, unseen_phrasing=True)
    print(
        f"SmolLM2-135M-Instruct nf4 (dequantised once), top {args.layers}, lr {args.lr:g}, {args.steps} steps"
    )
    bank = train_bank(backbone, data, args)
    keys = [routing_key(backbone, bank, [e.prompt for e in data[t][0]]) for t in TASKS]
    # the backbone's common direction, as the service computes it (the shipped general prompts)
    common = common_direction(embed_prompts(backbone, bank, list(ANCHOR_PROMPTS)))
    gates: dict[str, Gate] = {
        "centroid (top-2, T=0.1), plain cosine": CentroidGate(top_k=2, temperature=0.1),
        "centroid (top-1), plain cosine": CentroidGate(top_k=1),
        "centroid (top-2, T=0.1), common direction left out (the service's)": CentroidGate(
            top_k=2, temperature=0.1, common=common
        ),
        "centroid (top-2, T=0.05), common direction left out": CentroidGate(
            top_k=2, temperature=0.05, common=common
        ),
        "centroid (top-1), common direction left out": CentroidGate(top_k=1, common=common),
    }
    report("held-out prompts, training phrasings", backbone, bank, gates, data, keys)
    report("held-out prompts, unseen phrasings", backbone, bank, gates, unseen, keys)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
