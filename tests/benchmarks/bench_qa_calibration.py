"""Calibrating QA's probe drift bound (``QAPolicy.epsilon_probe``) on the real backbone (SmolLM2-135M, nf4).

Trains, in batched ``train_slots`` jobs on the real backbone (project defaults: rank 8, all linear modules of the
top 6 layers, ``lorafleet.training.personal_facts`` users, 30 steps at lr 2e-3, anchors 0.3 of the rows):

- good: each user's own facts, with anchors (the base's answers to ``ANCHOR_PROMPTS``), as production trains;
- harmful, no anchors: each user's own facts without any anchor row;
- harmful, another user's answers: user A's questions with user B's answers (anchored);
- harmful, huge lr: each user's facts without anchors at lr 1e-2 (the highest ``TrainingConfig`` accepts).

and prints, per adapter, the probe drift QA measures (``lorafleet.qa.probe``: teacher-forced NLL of the base's
own answers to the probe prompts, adapter minus base, nats/token) and the answers' token F1 on the user's unseen
paraphrases. The default ``epsilon_probe`` is set between the good and the harmful groups (figures in
``tests/benchmarks/README.md``). About 10 minutes on 2 CPU cores:

    PYTHONPATH=platform:. nice -n 19 .venv/bin/python tests/benchmarks/bench_qa_calibration.py --data-dir /tmp/demo1
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

from lorafleet.adapters import inject_bank  # noqa: E402
from lorafleet.adapters.dense import dense_budget, dense_views  # noqa: E402
from lorafleet.adapters.prefix import FrozenPrefix  # noqa: E402
from lorafleet.backbone import load_backbone  # noqa: E402
from lorafleet.qa.answers import token_f1  # noqa: E402
from lorafleet.qa.probe import probe_examples  # noqa: E402
from lorafleet.training import personal_facts as pf  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.dataset import Example, pad_token_id  # noqa: E402
from lorafleet.training.general_prompts import anchor_examples, generate_answers  # noqa: E402
from lorafleet.training.metrics import score_examples, summarize  # noqa: E402
from lorafleet.training.trainer import SlotTraining, train_slots  # noqa: E402

logger = logging.getLogger("bench_qa_calibration")


def top_layers_regex(num_layers: int, n: int) -> str:
    """Every linear module of the top ``n`` decoder layers (as ``bench_quality_real``)."""
    indices = "|".join(str(i) for i in range(num_layers - n, num_layers))
    return rf".*layers\.({indices})\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data-dir", default="/tmp/demo1")
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--probe-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    backbone = load_backbone("builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=args.data_dir)
    tokenizer = backbone.tokenizer
    layers = int(backbone.model.config.num_hidden_layers)
    config = TrainingConfig(max_steps=args.steps, max_seq_len=128)
    users = pf.make_users(args.users, seed=0)
    kinds: list[tuple[str, str]] = []  # (group, name), one per slot
    tasks: dict[float, list[SlotTraining]] = {config.learning_rate: [], 1e-2: []}
    bank = inject_bank(
        backbone, target_modules=top_layers_regex(layers, 6), n_slots=4 * args.users + 2, max_rank=config.rank
    )
    prefix = FrozenPrefix.for_bank(bank, identity="calibration", pad_id=pad_token_id(tokenizer))
    with bank.base_only():
        anchors = anchor_examples(backbone)
    n_anchor = round(config.anchor_ratio / (1 - config.anchor_ratio) * 24)

    def add(group: str, name: str, train: list[Example], lr: float, anchored: bool) -> None:
        slot = len(kinds)
        bank.init_slot(slot, config.slot_config(backbone_fingerprint=bank.fingerprint), seed=slot)
        tasks[lr].append(
            SlotTraining(
                slot=slot, key=name, train=train, holdout=[], anchors=anchors[:n_anchor] if anchored else []
            )
        )
        kinds.append((group, name))

    for i, user in enumerate(users):
        own = pf.user_examples(user, rounds=[1])
        other = pf.user_examples(users[(i + 1) % len(users)], rounds=[1])
        add("good", f"{user.key}: own facts, anchored", own, config.learning_rate, True)
        add("harmful", f"{user.key}: own facts, no anchors", own, config.learning_rate, False)
        wrong = [
            Example(e.record_id, e.prompt, o.completion, e.kind) for e, o in zip(own, other, strict=False)
        ]
        add("harmful", f"{user.key}: another user's answers", wrong, config.learning_rate, True)
        add("harmful", f"{user.key}: lr 1e-2, no anchors", own, 1e-2, False)
    for lr, batch in tasks.items():
        t0 = time.perf_counter()
        train_slots(bank, tokenizer, batch, config.with_changes(learning_rate=lr), prefix=prefix)
        logger.info("trained %d slots at lr %g in %.0f s", len(batch), lr, time.perf_counter() - t0)

    with dense_views(backbone.model, from_layer=0, budget_bytes=dense_budget(bank.device)):
        probe = probe_examples(backbone, args.probe_size, bank=bank)
        routes: list[list[tuple[int, float]]] = [[]] + [[(slot, 1.0)] for slot in range(len(kinds))]
        scores = score_examples(
            bank,
            tokenizer,
            [e for _ in routes for e in probe],
            [r for r in routes for _ in probe],
            max_seq_len=192,
            batch_size=32,
        )
        n = len(probe)
        losses = [summarize(scores[k * n : (k + 1) * n]).loss for k in range(len(routes))]
        evals = {u.key: pf.user_examples(u, rounds=[1], split="eval")[:8] for u in users}
        prompts, rows = [], []
        for slot, (_kind, name) in enumerate(kinds):
            owner = name.split(":")[0]
            for e in evals[owner]:
                prompts.append(e.prompt)
                rows.append([(slot, 1.0)])
        answers = generate_answers(bank.model, tokenizer, prompts, 24, bank=bank, routes=rows, trim=False)
    base = losses[0]
    print(f"\nprobe: {n} prompts, base NLL {base:.4f} nats/token")
    print(f"{'group':8} | {'adapter':40} | {'probe drift':>11} | {'answer F1':>9}")
    k = 0
    for slot, (kind, name) in enumerate(kinds):
        owner = name.split(":")[0]
        targets = [e.completion for e in evals[owner]]
        f1 = sum(token_f1(a, t) for a, t in zip(answers[k : k + len(targets)], targets, strict=True))
        k += len(targets)
        print(f"{kind:8} | {name:40} | {losses[slot + 1] - base:+11.4f} | {f1 / len(targets):9.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
