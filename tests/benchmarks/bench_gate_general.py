"""How well the gate tells a user's questions from general ones on the real backbone (embeddings only, no decoding).

Protocol, per seed: K users (``lorafleet.training.personal_facts``), each with an adapter whose routing key is
built from its round-1 training prompts' embeddings, several ways (``ADAPTER_SIDES``). Two kinds of prompt are
routed through a bank holding that one adapter:

- the user's unseen paraphrases of their own questions (they should go to the adapter);
- the 63 general prompts of ``general_prompts.EVAL_PROMPTS``, never used by the gate (they should go to the base).

The base's side is built from ``ANCHOR_PROMPTS`` three ways: ``centroid`` (one key, their mean, compared like an
adapter's key) and ``exemplars`` (the highest similarity to any of them: what ``routing.gates.CentroidGate`` does
for a version without a routing claim), each at several margins (the base wins when its score minus the margin
beats the adapter's), and ``routing claim`` (``routing.embeddings.fit_claim``: a linear probe fitted on the
adapter's training prompts against the anchor prompts; the base wins when its logit is not above 0: what the gate
does for versions that store one). The table gives,
per rule and margin, the share of personal questions kept on the adapter and of general prompts sent to the
base, per seed. The gate's ``GENERAL_MARGIN`` was chosen from this table. ``--rounds R`` gives each user the
facts of rounds 1..R: the key is built from all their training prompts (as a continuing version's, replay
included) and every round's unseen paraphrases are asked.

Run from the repository root (about 2 minutes on 2 cores):

    .venv/bin/python tests/benchmarks/bench_gate_general.py [--seeds 0 1 2] [--users 4] [--rounds 1] [--sides ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lorafleet.adapters import inject_bank  # noqa: E402
from lorafleet.backbone import load_backbone  # noqa: E402
from lorafleet.routing.embeddings import (  # noqa: E402
    claim_logits,
    common_direction,
    embed_prompts,
    fit_claim,
    key_vectors,
)
from lorafleet.routing.gates import GENERAL_MARGIN  # noqa: E402
from lorafleet.training.general_prompts import ANCHOR_PROMPTS, EVAL_PROMPTS  # noqa: E402
from lorafleet.training.personal_facts import make_users, split_questions, user_examples  # noqa: E402

MARGINS = (-0.01, 0.0, 0.005, 0.01, 0.02, 0.03)
#: the adapter's side: one key, the mean of its training prompts (what continual training stores), or up to k
#: keys (``routing.embeddings.key_vectors``: k-means of the training prompts' embeddings); a prompt's score is its
#: highest cosine to any of them
ADAPTER_SIDES = ("mean", "k2", "k4", "k8", "k16", "k32", "all")


def adapter_keys(embedded: torch.Tensor, side: str) -> torch.Tensor:
    """Unit key vectors ``[k, hidden]`` of an adapter side from its training prompts' embeddings (``all``: every
    training prompt is a key vector, nearest-neighbour routing)."""
    if side == "all":
        return F.normalize(embedded, dim=-1)
    k = 1 if side == "mean" else int(side[1:])
    return F.normalize(key_vectors(embedded, k), dim=-1)


def between_rounds(backbone: Any, bank: Any, common: torch.Tensor, args: argparse.Namespace) -> None:
    """Top-1 routing among one user's per-round adapters: how often a question reaches its own round's."""

    def centred(x: torch.Tensor) -> torch.Tensor:  # as the centroid gate scores: the common direction out
        return F.normalize(x - (x @ common)[..., None] * common, dim=-1)

    rounds = list(range(1, args.rounds + 1))
    print(f"rounds 1-{args.rounds}, one adapter each; questions routed to their own round's adapter (top 1):")
    for seed in args.seeds:
        hits = {"cosine": 0, "without the common direction": 0}
        total = 0
        for user in make_users(args.users, seed=seed):
            keys = [
                adapter_keys(
                    embed_prompts(
                        backbone, bank, [e.prompt for e in user_examples(user, rounds=[r], seed=seed)]
                    ),
                    "k8",
                )
                for r in rounds
            ]  # per round [k, hidden]
            for r in rounds:
                unseen = [q for f in user.facts_of([r]) for q in split_questions(f.kind, seed=seed)[1]]
                asked = embed_prompts(backbone, bank, unseen)  # [n, hidden]
                total += len(unseen)
                for name, view in (("cosine", lambda x: x), ("without the common direction", centred)):
                    query = view(asked)  # [n, hidden]
                    scores = torch.stack([(query @ view(k).T).max(dim=1).values for k in keys], dim=1)
                    hits[name] += int((scores.argmax(dim=1) == r - 1).sum())
        print(f"seed {seed}: " + ", ".join(f"{name} {100 * n / total:.1f} %" for name, n in hits.items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="facts of rounds 1..R: the key is built from all their training prompts (a continual version with "
        "replay) and every round's unseen paraphrases are asked",
    )
    parser.add_argument("--sides", nargs="+", default=list(ADAPTER_SIDES), choices=ADAPTER_SIDES)
    parser.add_argument(
        "--between-rounds",
        action="store_true",
        help="instead: one adapter per round of facts (rounds 1..R, each keyed by up to 8 vectors of its own "
        "training prompts); the share of unseen questions whose nearest adapter is their round's",
    )
    parser.add_argument(
        "--data-dir", default=None, help="where the converted backbone lives (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_backbone(
            args.backbone, quantization=args.quantization, device="cpu", data_dir=Path(args.data_dir or tmp)
        )
        bank = inject_bank(backbone, n_slots=1, max_rank=4)
        anchors = embed_prompts(backbone, bank, list(ANCHOR_PROMPTS))  # [n_anchor, hidden], unit rows
        centroid = F.normalize(anchors.mean(dim=0), dim=0)  # [hidden]
        general = embed_prompts(backbone, bank, list(EVAL_PROMPTS))  # [n_eval, hidden]
        if args.between_rounds:
            between_rounds(backbone, bank, common_direction(anchors), args)
            return
        rows: dict[tuple[str, float], list[str]] = {}
        for seed in args.seeds:
            personal_margin: dict[str, list[float]] = {}
            general_margin: dict[str, list[float]] = {}
            for user in make_users(args.users, seed=seed):
                rounds = list(range(1, args.rounds + 1))
                train = [e.prompt for e in user_examples(user, rounds=rounds, split="train", seed=seed)]
                embedded = embed_prompts(backbone, bank, train)  # [n_train, hidden]
                unseen = [q for f in user.facts_of(rounds) for q in split_questions(f.kind, seed=seed)[1]]
                asked = embed_prompts(backbone, bank, unseen)  # [n_unseen, hidden]
                claim = torch.tensor([fit_claim(embedded, anchors)])  # [1, hidden + 1]
                for prompts, out in ((asked, personal_margin), (general, general_margin)):
                    # the claim's logit is the margin: above 0 the adapter holds the prompt
                    out.setdefault("routing claim", []).extend(claim_logits(claim, prompts)[:, 0].tolist())
                for side in args.sides:
                    keys = adapter_keys(embedded, side)  # [k, hidden], unit rows
                    for prompts, out in ((asked, personal_margin), (general, general_margin)):
                        adapter = (prompts @ keys.T).max(dim=1).values  # [n]
                        out.setdefault(f"{side} / centroid", []).extend(
                            (adapter - prompts @ centroid).tolist()
                        )
                        out.setdefault(f"{side} / exemplars", []).extend(
                            (adapter - (prompts @ anchors.T).max(dim=1).values).tolist()
                        )
            for rule in personal_margin:
                for margin in (0.0,) if rule == "routing claim" else MARGINS:
                    # the base wins when adapter score - base score < -margin (a claim: when its logit <= 0)
                    if rule == "routing claim":
                        kept = sum(d > 0 for d in personal_margin[rule]) / len(personal_margin[rule])
                        based = sum(d <= 0 for d in general_margin[rule]) / len(general_margin[rule])
                    else:
                        kept = sum(d >= -margin for d in personal_margin[rule]) / len(personal_margin[rule])
                        based = sum(d < -margin for d in general_margin[rule]) / len(general_margin[rule])
                    rows.setdefault((rule, margin), []).append(f"{100 * kept:.0f} / {100 * based:.0f}")
        print(
            f"backbone {args.backbone} ({args.quantization}), {args.users} users, rounds 1-{args.rounds}, "
            f"seeds {args.seeds}, "
            f"threads {torch.get_num_threads()}; the gate uses exemplars, margin {GENERAL_MARGIN}\n"
        )
        print(
            "| adapter side / base side | margin | "
            + " | ".join(f"seed {s}: personal kept / general to base, %" for s in args.seeds)
            + " |"
        )
        print("| --- | --- |" + " --- |" * len(args.seeds))
        for (rule, margin), cells in rows.items():
            print(f"| {rule} | {margin:+.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
