"""Routing benchmark (not CI): centroid and learned gates on a three-task bank, accuracy and mixture loss.

Three adapters are trained with the project's trainer on the three synthetic tasks of
``lorafleet.training.synthetic_routing`` (pig latin, reversal, favourites) on the built-in tiny backbone. Each held-out
prompt is routed by each gate over the bank of the three adapters; routing accuracy is the share whose
heaviest route is the prompt's own task adapter. The holdout loss (teacher-forced, completion tokens) of the
gated mixture is compared with the oracle (the right adapter alone, weight 1), uniform averaging (1/3 each)
and the base model. A second holdout uses phrasings never seen in training.

Run from the repository root (a few minutes on 2 CPU cores):

    .venv/bin/python tests/benchmarks/bench_routing.py

Prints the markdown tables of the "Routing" section of tests/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

from lorafleet.adapters import AdapterBank, inject_bank  # noqa: E402
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone  # noqa: E402
from lorafleet.routing.embeddings import embed_prompts, routing_key  # noqa: E402
from lorafleet.routing.experts import Expert, ExpertSet, experts_revision  # noqa: E402
from lorafleet.routing.gates import CentroidGate, Gate, LearnedGate  # noqa: E402
from lorafleet.routing.learned import GateTrainingConfig, train_learned_gate  # noqa: E402
from lorafleet.routing.spec import GateSpec  # noqa: E402
from lorafleet.training import Example, SlotTraining, TrainingConfig, train_slots  # noqa: E402
from lorafleet.training.metrics import score_examples, summarize  # noqa: E402
from lorafleet.training.synthetic_routing import TASKS, three_tasks  # noqa: E402

MAX_SEQ = 96


@dataclass(frozen=True)
class GateResult:
    name: str
    accuracy: float
    top_weight: float
    loss: float


def train_bank(
    backbone: Backbone, data: dict[str, tuple[list[Example], list[Example]]], steps: int
) -> AdapterBank:
    """Slot i = an adapter trained on task i (all linear layers, rank 8)."""
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=len(TASKS), max_rank=8)
    config = TrainingConfig(
        rank=8, alpha=16, dropout=0.0, learning_rate=1e-2, max_steps=steps, batch_size=8, max_seq_len=MAX_SEQ
    )
    tasks = []
    for slot, task in enumerate(TASKS):
        bank.init_slot(slot, config.slot_config(name=task), seed=slot)
        tasks.append(SlotTraining(slot=slot, key=task, train=data[task][0], holdout=data[task][1]))
    for result in train_slots(bank, backbone.tokenizer, tasks, config):
        m = result.metrics
        print(f"  {result.key}: holdout loss {m['holdout_loss_before']:.3f} -> {m['holdout_loss_after']:.3f}")
    return bank


def user_bank_of(keys: Sequence[tuple[float, ...]]) -> ExpertSet:
    """The user's experts in memory: member i = task i's adapter (adapter id i + 1) with its routing key."""
    members = tuple(
        Expert(i + 1, task, "personal", 10 + i, 1, f"{i:064x}", 0, 8, keys[i]) for i, task in enumerate(TASKS)
    )
    gate = GateSpec()
    return ExpertSet(1, 1, "bench-user", members, gate, experts_revision(members, gate))


def holdout_loss(
    backbone: Backbone, bank: AdapterBank, examples: list[Example], routes: list[list[tuple[int, float]]]
) -> float:
    return summarize(score_examples(bank, backbone.tokenizer, examples, routes, max_seq_len=MAX_SEQ)).loss


def evaluate_gate(
    name: str,
    gate: Gate,
    *,
    backbone: Backbone,
    bank: AdapterBank,
    user_bank: ExpertSet,
    embeddings: torch.Tensor,
    examples: list[Example],
    labels: list[int],
) -> GateResult:
    decisions = gate.decide(user_bank, embeddings)
    accuracy = sum(d.routes[0][0] == y for d, y in zip(decisions, labels, strict=True)) / len(labels)
    top_weight = statistics.mean(d.routes[0][1] for d in decisions)
    loss = holdout_loss(backbone, bank, examples, [list(d.routes) for d in decisions])  # member i = slot i
    return GateResult(name, accuracy, top_weight, loss)


@dataclass(frozen=True)
class Holdout:
    """One holdout split ready to route: its examples, each one's task index, their pooled base embeddings, and
    the reference losses (oracle: each prompt on its own task's adapter; uniform: 1/3 on each; base: none)."""

    examples: list[Example]
    labels: list[int]
    embeddings: torch.Tensor
    oracle: float
    uniform: float
    base: float


def prepare_holdout(
    backbone: Backbone, bank: AdapterBank, split: dict[str, tuple[list[Example], list[Example]]]
) -> Holdout:
    """The held-out examples of every task in ``split`` (slot i = task i), embedded and scored as references."""
    examples = [e for t in TASKS for e in split[t][1]]
    labels = [i for i, t in enumerate(TASKS) for _ in split[t][1]]
    return Holdout(
        examples=examples,
        labels=labels,
        embeddings=embed_prompts(backbone, bank, [e.prompt for e in examples]),
        oracle=holdout_loss(backbone, bank, examples, [[(y, 1.0)] for y in labels]),
        uniform=holdout_loss(backbone, bank, examples, [[(s, 1 / 3) for s in range(3)]] * len(examples)),
        base=holdout_loss(backbone, bank, examples, [[] for _ in examples]),
    )


def evaluate_gates(
    holdout: Holdout, gates: dict[str, Gate], *, backbone: Backbone, bank: AdapterBank, user_bank: ExpertSet
) -> list[GateResult]:
    """Each gate's routing accuracy, mean top weight and gated holdout loss on ``holdout``."""
    return [
        evaluate_gate(
            name,
            gate,
            backbone=backbone,
            bank=bank,
            user_bank=user_bank,
            embeddings=holdout.embeddings,
            examples=holdout.examples,
            labels=holdout.labels,
        )
        for name, gate in gates.items()
    ]


def median_ms(fn: Callable[[], object], runs: int = 20) -> float:
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the adapters")
    parser.add_argument("--train", type=int, default=96, help="training examples per task")
    parser.add_argument("--holdout", type=int, default=48, help="held-out examples per task")
    parser.add_argument("--quantization", default="fp32", choices=["fp32", "nf4"])
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-routing-") as tmp:
        backbone = load_backbone(build_tiny_backbone(tmp), quantization=args.quantization, device="cpu")
        run(backbone, args)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


def run(backbone: Backbone, args: argparse.Namespace) -> None:
    data = three_tasks(n_train=args.train, n_holdout=args.holdout)
    unseen = three_tasks(n_train=args.train, n_holdout=args.holdout, unseen_phrasing=True)
    print(f"training 3 adapters ({args.steps} steps, {args.quantization}):")
    bank = train_bank(backbone, data, args.steps)
    keys = [routing_key(backbone, bank, [e.prompt for e in data[t][0]]) for t in TASKS]
    user_bank = user_bank_of(keys)
    prompts = {m.adapter_id: [e.prompt for e in data[m.adapter_name][0]] for m in user_bank.members}
    gates: dict[str, Gate] = {
        "centroid (top-2, T=0.1)": CentroidGate(top_k=2, temperature=0.1),
        "centroid (top-1)": CentroidGate(top_k=1),
    }
    for arch in ("linear", "mlp"):
        trained = train_learned_gate(
            backbone, bank, user_bank=user_bank, prompts=prompts, config=GateTrainingConfig(arch=arch)
        )
        gates[f"learned {arch} (top-2)"] = LearnedGate(model=trained.model, top_k=2, fallback=CentroidGate())
    for title, split in (
        ("held-out prompts, training phrasings", data),
        ("held-out prompts, unseen phrasings", unseen),
    ):
        report(title, backbone=backbone, bank=bank, user_bank=user_bank, gates=gates, split=split)
    report_latency(backbone, bank, user_bank, gates, [e.prompt for t in TASKS for e in data[t][1]][:64])


def report(
    title: str,
    *,
    backbone: Backbone,
    bank: AdapterBank,
    user_bank: ExpertSet,
    gates: dict[str, Gate],
    split: dict[str, tuple[list[Example], list[Example]]],
    loss_label: str = "Holdout loss",
    vs_uniform: bool = True,
) -> None:
    """A Markdown table of each gate's routing accuracy and gated loss on one holdout, against oracle (and, with
    ``vs_uniform``, against uniform weights too); ``loss_label`` heads the line of reference losses."""
    holdout = prepare_holdout(backbone, bank, split)
    oracle, uniform, base = holdout.oracle, holdout.uniform, holdout.base
    print(
        f"\n**{title}** ({len(holdout.examples)} prompts). {loss_label}: oracle {oracle:.4f}, uniform {uniform:.4f}, base {base:.4f}.\n"
    )
    columns = ["gate", "routing accuracy", "mean top weight", "holdout loss", "vs oracle"]
    if vs_uniform:
        columns.append("vs uniform")
    print(_row(columns))
    print(_row(["---"] * len(columns)))
    for r in evaluate_gates(holdout, gates, backbone=backbone, bank=bank, user_bank=user_bank):
        cells = [
            r.name,
            f"{r.accuracy:.1%}",
            f"{r.top_weight:.3f}",
            f"{r.loss:.4f}",
            f"{r.loss / oracle - 1:+.2%}",
        ]
        print(_row([*cells, f"{r.loss / uniform - 1:+.2%}"] if vs_uniform else cells))
    cells = ["uniform (1/3 each)", "-", "0.333", f"{uniform:.4f}", f"{uniform / oracle - 1:+.2%}"]
    print(_row([*cells, "+0.00%"] if vs_uniform else cells))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report_latency(
    backbone: Backbone, bank: AdapterBank, user_bank: ExpertSet, gates: dict[str, Gate], prompts: list[str]
) -> None:
    embed = median_ms(lambda: embed_prompts(backbone, bank, prompts, batch_size=len(prompts)), runs=5)
    embeddings = embed_prompts(backbone, bank, prompts)
    print(f"\nCost per batch of {len(prompts)} prompts: pooled base embeddings {embed:.1f} ms;", end="")
    decide = {name: median_ms(_decider(gate, user_bank, embeddings)) for name, gate in gates.items()}
    print(" gate decisions " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in decide.items()) + ".")


def _decider(gate: Gate, user_bank: ExpertSet, embeddings: torch.Tensor) -> Callable[[], object]:
    return lambda: gate.decide(user_bank, embeddings)


if __name__ == "__main__":
    main()
