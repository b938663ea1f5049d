"""A synthetic multi-user personalisation task with a known chance level (tests, the quality benchmark, the demo).

Every user has a private, seeded preference: for each of 12 topics ("color", "pet", ...) one of 8 answers. A
record asks about a topic in one of several phrasings (an opener, a template, the topic word) and its completion
is the user's answer and a newline. Nothing in a prompt reveals the answer, so a model that does not know the
user (the base model, or another user's adapter) can only guess: picking among the topic's 8 answers it is
right 1 time in 8 (``CHANCE``), whatever its biases, because users' answers are uniform and independent.

Topics come in rounds (1, 2, 3; 4 topics each), so the round-one holdout measures forgetting after later rounds.
The train/holdout split is the production one (``build_dataset``, by content hash): holdout records are unseen
combinations of opener, template and topic, about topics the user trained on, so they are answerable.

Metrics (teacher-forced on the completion): token accuracy; answer accuracy (every completion token is the
argmax); choice accuracy (the user's answer has the highest mean per-token likelihood among the topic's 8 answers,
so answer length does not decide; chance 1/8).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lorafleet.domain import FeedbackRecord
from lorafleet.errors import ValidationError
from lorafleet.feedback import prepare_record
from lorafleet.training.dataset import Example

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank

#: topic -> its possible answers; within a topic answers start with different letters (one token decides)
TOPICS: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "teal"),
    "pet": ("cat", "dog", "hamster", "parrot", "rabbit", "turtle", "snake", "fish"),
    "drink": ("tea", "coffee", "water", "juice", "milk", "soda", "lemonade", "kombucha"),
    "fruit": ("apple", "banana", "cherry", "grape", "mango", "pear", "kiwi", "orange"),
    "sport": ("tennis", "soccer", "golf", "rugby", "hockey", "boxing", "cycling", "judo"),
    "city": ("paris", "tokyo", "lima", "cairo", "oslo", "rome", "delhi", "boston"),
    "music": ("jazz", "rock", "blues", "opera", "funk", "salsa", "techno", "gospel"),
    "dish": ("pizza", "sushi", "tacos", "curry", "ramen", "lasagna", "burger", "falafel"),
    "flower": ("rose", "tulip", "lily", "daisy", "orchid", "iris", "poppy", "sunflower"),
    "game": ("chess", "poker", "tetris", "sudoku", "bingo", "darts", "mahjong", "risk"),
    "car": ("volvo", "tesla", "fiat", "honda", "mazda", "audi", "kia", "jeep"),
    "hobby": ("knitting", "painting", "hiking", "fishing", "baking", "gardening", "reading", "yoga"),
}
N_ANSWERS = 8
CHANCE = 1.0 / N_ANSWERS
ROUNDS: tuple[tuple[str, ...], ...] = (
    ("color", "pet", "drink", "fruit"),
    ("sport", "city", "music", "dish"),
    ("flower", "game", "car", "hobby"),
)
TEMPLATES: tuple[str, ...] = (
    "Q: my favourite {topic}?",
    "What {topic} do I like best?",
    "Tell me my top {topic}.",
    "Which {topic} would I pick?",
    "Guess my favorite {topic}!",
    "The {topic} I love most is?",
    "Remind me: best {topic} for me?",
    "Name the {topic} I prefer.",
)
OPENERS: tuple[str, ...] = ("", "Hi! ", "Hey, ", "Quick one. ", "So, ", "Hello. ")
ANSWER_CUE = "\nA: "
_TOPIC_WORD = re.compile(r"\b(" + "|".join(TOPICS) + r")\b")


@dataclass(frozen=True)
class PersonalisationScores:
    """Teacher-forced scores of one adapter (or the base) on a set of synthetic examples."""

    token_accuracy: float
    answer_accuracy: float
    choice_accuracy: float
    examples: int


def user_preferences(user_key: str) -> dict[str, str]:
    """The user's secret answer for every topic (seeded by the user key, the same in every process)."""
    rng = random.Random(f"lorafleet-synthetic/{user_key}")
    return {topic: rng.choice(answers) for topic, answers in TOPICS.items()}


def round_topics(round: int) -> tuple[str, ...]:
    """The topics a round (1-based) introduces."""
    if not 1 <= round <= len(ROUNDS):
        raise ValidationError(f"round must be in 1..{len(ROUNDS)}, got {round}")
    return ROUNDS[round - 1]


def prompt_for(topic: str, *, template: int, opener: int) -> str:
    """One phrasing of the question about ``topic``."""
    return OPENERS[opener] + TEMPLATES[template].format(topic=topic) + ANSWER_CUE


def make_user_records(user_key: str, *, round: int, n_records: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n_records`` distinct sft records (dicts for ``ingest_feedback``) about the round's topics.

    Phrasings are drawn without replacement from every opener x template x topic of the round (192), seeded by
    ``seed``, the user and the round; metadata (not part of the content hash) names the topic and round.
    """
    combos = list(itertools.product(round_topics(round), range(len(TEMPLATES)), range(len(OPENERS))))
    if not 1 <= n_records <= len(combos):
        raise ValidationError(f"n_records must be in 1..{len(combos)} per round, got {n_records}")
    preferences = user_preferences(user_key)
    picked = random.Random(f"lorafleet-synthetic/{seed}/{user_key}/{round}").sample(combos, n_records)
    return [
        {
            "kind": "sft",
            "prompt": prompt_for(topic, template=template, opener=opener),
            "completion": preferences[topic] + "\n",
            "metadata": {"synthetic": True, "topic": topic, "round": round},
        }
        for topic, template, opener in picked
    ]


def to_feedback_records(
    records: Iterable[Mapping[str, Any]], *, user_id: int = 1, first_id: int = 1
) -> list[FeedbackRecord]:
    """Record dicts as stored ``FeedbackRecord`` objects (validated and hashed as ingestion does), without a DB."""
    now = datetime.now(UTC)
    out = []
    for index, raw in enumerate(records):
        prepared = prepare_record(raw, index=index)
        out.append(
            FeedbackRecord(
                first_id + index, user_id, prepared.kind, prepared.payload, prepared.content_hash, now
            )
        )
    return out


def topic_of(prompt: str) -> str:
    """The topic a synthetic prompt asks about."""
    match = _TOPIC_WORD.search(prompt)
    if match is None:
        raise ValidationError(f"not a synthetic prompt: {prompt!r}")
    return match.group(1)


def choice_examples(example: Example) -> list[Example]:
    """The example with each of its topic's answers as the completion (for choice accuracy)."""
    answers = TOPICS[topic_of(example.prompt)]
    return [Example(example.record_id, example.prompt, answer + "\n", example.kind) for answer in answers]


def evaluate_personalisation(
    bank: AdapterBank,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    slot: int | None,
    max_seq_len: int = 64,
    batch_size: int = 64,
) -> PersonalisationScores:
    """Token, answer and choice accuracy of ``slot`` (None = the base model) on synthetic examples."""
    from lorafleet.training.metrics import score_examples, summarize  # torch, on first use

    if not examples:
        raise ValidationError("no examples to evaluate")
    route = [] if slot is None else [(slot, 1.0)]
    own = score_examples(
        bank, tokenizer, examples, [route] * len(examples), max_seq_len=max_seq_len, batch_size=batch_size
    )
    candidates = [c for e in examples for c in choice_examples(e)]
    scored = score_examples(
        bank, tokenizer, candidates, [route] * len(candidates), max_seq_len=max_seq_len, batch_size=batch_size
    )
    hits = 0
    for i, example in enumerate(examples):
        options = scored[i * N_ANSWERS : (i + 1) * N_ANSWERS]
        best = min(range(N_ANSWERS), key=lambda j: options[j].loss_sum / max(1, options[j].tokens))
        hits += candidates[i * N_ANSWERS + best].completion == example.completion
    summary = summarize(own)
    return PersonalisationScores(
        token_accuracy=summary.token_accuracy,
        answer_accuracy=summary.sequence_accuracy,
        choice_accuracy=hits / len(examples),
        examples=len(examples),
    )
