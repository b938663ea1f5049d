"""Quality benchmark of the trainer on the synthetic personalisation task (``lorafleet.training.synthetic``).

Protocol: U users with private preferences on the built-in tiny backbone (nf4). Round 1 trains every user's
fresh adapter on its round-one records; rounds 2 and 3 continue from the previous adapter on that round's new
records plus a replay sample of older training records (``replay_ratio`` per new record), once with replay and
once without (two copies of each round-one adapter, trained side by side in the same jobs). Holdouts are the
production split (by content hash). Reported: answer/choice/token accuracy of the base and of each adapter,
forgetting of the round-one holdout after round three with and without replay, the cross-user check (user A's
adapter on user B's holdout), and throughput (users trained per minute at K = 1 and K = 16 per job).

Run from the repository root: ``.venv/bin/python tests/benchmarks/bench_quality.py`` (about 5 minutes, one torch
thread; ``--help`` for options). Prints progress and a Markdown report.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lorafleet.adapters import AdapterBank, inject_bank  # noqa: E402
from lorafleet.backbone import build_tiny_backbone, load_backbone  # noqa: E402
from lorafleet.training import synthetic  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.dataset import Example, build_dataset, reservoir_sample  # noqa: E402
from lorafleet.training.synthetic import PersonalisationScores, evaluate_personalisation  # noqa: E402
from lorafleet.training.trainer import SlotTraining, train_slots  # noqa: E402

logger = logging.getLogger("bench_quality")
ROUNDS = (1, 2, 3)


@dataclass
class User:
    """One benchmark user: its key, slots in both arms, and per-round train/holdout examples."""

    key: str
    slot_replay: int
    slot_plain: int
    train: dict[int, tuple[Example, ...]] = field(default_factory=dict)
    holdout: dict[int, tuple[Example, ...]] = field(default_factory=dict)

    def holdout_upto(self, last: int) -> list[Example]:
        return [e for r in ROUNDS if r <= last for e in self.holdout[r]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--records", type=int, default=64, help="records per user per round")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--replay-ratio", type=float, default=2.0)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--throughput-steps", type=int, default=100)
    parser.add_argument(
        "--throughput-k1-users", type=int, default=4, help="K=1 jobs to time (rate extrapolates)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the tiny model's matmuls gain nothing from 2)",
    )
    return parser.parse_args()


def make_users(n: int, *, records: int, config: TrainingConfig, seed: int) -> list[User]:
    users = []
    for i in range(n):
        user = User(f"user-{i}", slot_replay=i, slot_plain=n + i)
        first_id = 1
        for r in ROUNDS:
            raw = synthetic.make_user_records(user.key, round=r, n_records=records, seed=seed)
            dataset = build_dataset(synthetic.to_feedback_records(raw, first_id=first_id), config=config)
            first_id += len(raw)
            user.train[r], user.holdout[r] = dataset.train, dataset.holdout
        users.append(user)
    return users


def round_examples(user: User, r: int, *, replay_ratio: float, seed: int) -> list[Example]:
    """Round r's new training examples plus a replay sample of older ones (``replay_ratio`` per new one)."""
    new = list(user.train[r])
    old = [e for earlier in ROUNDS if earlier < r for e in user.train[earlier]]
    k = round(replay_ratio * len(new))
    return new + reservoir_sample(old, k, seed=seed + r)


def score(
    bank: AdapterBank, tokenizer: object, examples: Sequence[Example], slot: int | None
) -> PersonalisationScores:
    return evaluate_personalisation(bank, tokenizer, examples, slot=slot, max_seq_len=64)


def run_rounds(
    bank: AdapterBank,
    tokenizer: object,
    users: list[User],
    config: TrainingConfig,
    replay_ratio: float,
    seed: int,
) -> dict[str, dict[str, PersonalisationScores]]:
    """Train the three rounds; scores per user key, by name ("base_all", "r1", "r3_replay_r1", "cross", ...)."""
    results: dict[str, dict[str, PersonalisationScores]] = {u.key: {} for u in users}
    for user in users:
        results[user.key]["base_r1"] = score(bank, tokenizer, user.holdout[1], None)
        results[user.key]["base_all"] = score(bank, tokenizer, user.holdout_upto(3), None)
        bank.init_slot(user.slot_replay, config.slot_config(), seed=seed + user.slot_replay)
    logger.info("round 1: %d users, %d steps", len(users), config.max_steps)
    tasks = [SlotTraining(u.slot_replay, u.key, u.train[1], u.holdout[1]) for u in users]
    train_slots(bank, tokenizer, tasks, config)
    for user in users:
        results[user.key]["r1"] = score(bank, tokenizer, user.holdout[1], user.slot_replay)
        state = bank.slot_state_dict(user.slot_replay)
        bank.load_slot(user.slot_plain, state, config.slot_config(), replace=True)
    log_means(results, ["base_all", "r1"])
    for r in ROUNDS[1:]:
        tasks = []
        for user in users:
            holdout = user.holdout[r]
            tasks.append(
                SlotTraining(
                    user.slot_replay,
                    f"{user.key}/replay",
                    round_examples(user, r, replay_ratio=replay_ratio, seed=seed),
                    holdout,
                )
            )
            tasks.append(
                SlotTraining(
                    user.slot_plain,
                    f"{user.key}/plain",
                    round_examples(user, r, replay_ratio=0.0, seed=seed),
                    holdout,
                )
            )
        logger.info("round %d: %d users x 2 arms, %d steps", r, len(users), config.max_steps)
        train_slots(bank, tokenizer, tasks, config.with_changes(seed=config.seed + r))
    for user in users:
        scores = results[user.key]
        scores["r3_replay_all"] = score(bank, tokenizer, user.holdout_upto(3), user.slot_replay)
        scores["r3_replay_r1"] = score(bank, tokenizer, user.holdout[1], user.slot_replay)
        scores["r3_plain_all"] = score(bank, tokenizer, user.holdout_upto(3), user.slot_plain)
        scores["r3_plain_r1"] = score(bank, tokenizer, user.holdout[1], user.slot_plain)
    log_means(results, ["r3_replay_all", "r3_replay_r1", "r3_plain_all", "r3_plain_r1"])
    for i, user in enumerate(users):
        others = [o for o in users if o is not user]
        cross = [score(bank, tokenizer, o.holdout_upto(3), user.slot_replay) for o in others]
        results[user.key]["cross"] = PersonalisationScores(
            token_accuracy=statistics.mean(c.token_accuracy for c in cross),
            answer_accuracy=statistics.mean(c.answer_accuracy for c in cross),
            choice_accuracy=statistics.mean(c.choice_accuracy for c in cross),
            examples=sum(c.examples for c in cross),
        )
        logger.info("cross-user check %d/%d done", i + 1, len(users))
    return results


def log_means(results: dict[str, dict[str, PersonalisationScores]], names: list[str]) -> None:
    """One progress line per result name: mean answer / choice / token accuracy over users."""
    for name in names:
        rows = [r[name] for r in results.values()]
        logger.info(
            "%s: answer %.3f, choice %.3f, token %.3f",
            name,
            statistics.mean(r.answer_accuracy for r in rows),
            statistics.mean(r.choice_accuracy for r in rows),
            statistics.mean(r.token_accuracy for r in rows),
        )


def throughput(
    bank: AdapterBank, tokenizer: object, users: list[User], config: TrainingConfig, *, k: int, jobs: int
) -> float:
    """Users trained per minute: ``jobs`` jobs of ``k`` users each (fresh slots), whole ``train_slots`` timed."""
    done, elapsed = 0, 0.0
    for job in range(jobs):
        group = [users[(job * k + j) % len(users)] for j in range(k)]
        tasks = []
        for j, user in enumerate(group):
            bank.init_slot(j, config.slot_config(), seed=j, replace=True)
            tasks.append(SlotTraining(j, f"{user.key}/tp{j}", user.train[1], user.holdout[1]))
        start = time.perf_counter()
        train_slots(bank, tokenizer, tasks, config)
        elapsed += time.perf_counter() - start
        done += k
        logger.info("throughput K=%d: job %d/%d, %.1f s so far", k, job + 1, jobs, elapsed)
    return done / elapsed * 60.0


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def report(
    users: list[User], results: dict[str, dict[str, PersonalisationScores]], rates: dict[int, float]
) -> str:
    lines = [
        "| user | base ans / choice | R1 after R1: ans / tok | all after R3: ans / tok | R1 after R3 replay: ans | R1 after R3 no replay: ans | cross-user ans / choice |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for user in users:
        s = results[user.key]
        lines.append(
            f"| {user.key} | {pct(s['base_all'].answer_accuracy)} / {pct(s['base_all'].choice_accuracy)} "
            f"| {pct(s['r1'].answer_accuracy)} / {pct(s['r1'].token_accuracy)} "
            f"| {pct(s['r3_replay_all'].answer_accuracy)} / {pct(s['r3_replay_all'].token_accuracy)} "
            f"| {pct(s['r3_replay_r1'].answer_accuracy)} | {pct(s['r3_plain_r1'].answer_accuracy)} "
            f"| {pct(s['cross'].answer_accuracy)} / {pct(s['cross'].choice_accuracy)} |"
        )

    def mean(name: str, metric: str) -> float:
        return statistics.mean(getattr(results[u.key][name], metric) for u in users)

    forget_replay = mean("r1", "answer_accuracy") - mean("r3_replay_r1", "answer_accuracy")
    forget_plain = mean("r1", "answer_accuracy") - mean("r3_plain_r1", "answer_accuracy")
    lines.append(
        f"| **mean** | {pct(mean('base_all', 'answer_accuracy'))} / {pct(mean('base_all', 'choice_accuracy'))} "
        f"| {pct(mean('r1', 'answer_accuracy'))} / {pct(mean('r1', 'token_accuracy'))} "
        f"| {pct(mean('r3_replay_all', 'answer_accuracy'))} / {pct(mean('r3_replay_all', 'token_accuracy'))} "
        f"| {pct(mean('r3_replay_r1', 'answer_accuracy'))} | {pct(mean('r3_plain_r1', 'answer_accuracy'))} "
        f"| {pct(mean('cross', 'answer_accuracy'))} / {pct(mean('cross', 'choice_accuracy'))} |"
    )
    lines += [
        "",
        f"Forgetting of the round-one holdout (answer accuracy, points): with replay {100 * forget_replay:.1f}, "
        f"without replay {100 * forget_plain:.1f}.",
        f"Choice accuracy after round three (replay): {pct(mean('r3_replay_all', 'choice_accuracy'))}; "
        f"base choice accuracy {pct(mean('base_all', 'choice_accuracy'))} (chance {pct(synthetic.CHANCE)}).",
        "",
    ]
    if rates:
        lines += ["| users per job K | users trained per minute |", "| --- | --- |"]
    lines += [f"| {k} | {rate:.1f} |" for k, rate in sorted(rates.items())]
    if len(rates) == 2:
        lines.append(f"\nK = 16 trains {rates[16] / rates[1]:.1f}x more users per minute than K = 1.")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = TrainingConfig(
        rank=args.rank,
        alpha=args.alpha,
        learning_rate=args.lr,
        max_steps=args.steps,
        batch_size=8,
        max_seq_len=64,
        replay_ratio=args.replay_ratio,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as data_dir:
        backbone = load_backbone(
            build_tiny_backbone(Path(data_dir)), quantization=args.quantization, device="cpu"
        )
        users = make_users(args.users, records=args.records, config=config, seed=args.seed)
        logger.info(
            "holdout sizes per user and round: %s", [[len(u.holdout[r]) for r in ROUNDS] for u in users]
        )
        bank = inject_bank(backbone, n_slots=max(2 * args.users, 16), max_rank=max(16, args.rank))
        results = run_rounds(bank, backbone.tokenizer, users, config, args.replay_ratio, args.seed)
        rates: dict[int, float] = {}
        if not args.skip_throughput:
            tp_config = config.with_changes(max_steps=args.throughput_steps)
            rates[1] = throughput(
                bank, backbone.tokenizer, users, tp_config, k=1, jobs=args.throughput_k1_users
            )
            rates[16] = throughput(bank, backbone.tokenizer, users, tp_config, k=16, jobs=1)
    print(
        f"\nconfig: {config.model_dump()}  quantization={args.quantization} users={args.users} "
        f"records/round={args.records}\n"
    )
    print(report(users, results, rates))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
