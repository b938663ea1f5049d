"""Contrast rows: a user's own questions asked about someone else, so its adapter learns whose facts they are.

A personal adapter learns "a question about a city -> Galway" as readily as "a question about *my* city ->
Galway", and then answers "What is the capital of Spain?" with "The capital of Spain is Galway.". A contrast row
keeps everything of a training row but its subject: the prompt is rewritten from the first person to a named third
party ("Where do I live?" -> "Where does Sam live?") and the completion stays the user's own answer. The trainer
puts no likelihood on that completion; it treats the row as an anchor, so the anchor unlikelihood pushes the user's
personal tokens down at its answer positions (exactly where "You live in" would be followed by "Galway"). The anchor
distillation leaves contrast rows out: pulled to the base's distribution there, the adapters of the benchmark lost
a tenth of their own facts.

The rewrite is English only and rule-based (``third_person``): a prompt without a first-person word gives no row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from lorafleet.training.dataset import Example, reservoir_sample

#: the kind of a contrast row (``Example.kind``); the trainer trains no likelihood on such a row's completion
CONTRAST_KIND = "contrast"
#: first record id of contrast rows (beside ``general_prompts.ANCHOR_FIRST_ID``; training reads no record id)
CONTRAST_FIRST_ID = 2_000_000
#: the third parties a rewritten prompt asks about, in turn (none is a value of the shipped personal facts)
CONTRAST_NAMES = ("Sam", "Alex", "Priya", "Tom")
#: "me" after these verbs is the one asking the assistant ("Tell me Sam's favourite sport."), and stays
_ASKING = "".join(
    f"(?<![{v[0]}{v[0].lower()}]{v[1:]} )" for v in ("Tell", "Remind", "Give", "Show", "Help", "Let")
)
#: first-person forms and their third-person replacements, longest first ({n}: the third party's name)
_REWRITES: tuple[tuple[str, str], ...] = (
    (r"\bDo I\b", "Does {n}"),
    (r"\bdo I\b", "does {n}"),
    (r"\bAm I\b", "Is {n}"),
    (r"\bam I\b", "is {n}"),
    (r"\bhave I\b", "has {n}"),
    (r"\bI'm\b", "{n} is"),
    (r"\bI've\b", "{n} has"),
    (r"\bI'd\b", "{n} would"),
    (r"\bI\b", "{n}"),
    (r"\bmine\b", "{n}'s"),
    (r"\b[Mm]y\b", "{n}'s"),
    (_ASKING + r"\bme\b", "{n}"),
)
_FIRST_PERSON = re.compile(r"\b(I|I'm|I've|I'd|[Mm]y|mine)\b|" + _ASKING + r"\bme\b")


def third_person(prompt: str, name: str) -> str | None:
    """``prompt`` asked about ``name`` instead of the speaker; None when it has no first-person word."""
    if not _FIRST_PERSON.search(prompt):
        return None
    for pattern, replacement in _REWRITES:
        prompt = re.sub(pattern, replacement.format(n=name), prompt)
    return prompt


def contrast_examples(train: Sequence[Example], *, first_id: int, limit: int | None = None) -> list[Example]:
    """Contrast rows of the SFT examples in ``train`` (at most ``limit``, in order), record ids from ``first_id``.

    A row given as messages keeps its earlier turns and has its last user turn rewritten; preference pairs and
    ratings give none (they teach a style, not a fact)."""
    rows: list[Example] = []
    for example in train:
        if limit is not None and len(rows) >= limit:
            break
        if example.kind != "sft" or example.rejected is not None:
            continue
        prompt = third_person(example.prompt, CONTRAST_NAMES[len(rows) % len(CONTRAST_NAMES)])
        if prompt is None:
            continue
        context = example.context
        if context:
            users = [i for i, (role, _) in enumerate(context) if role == "user"]
            # no user turn: the prompt was the last message of another role, nothing to ask about someone else
            if not users:
                continue
            context = (*context[: users[-1]], ("user", prompt), *context[users[-1] + 1 :])
        rows.append(Example(first_id + len(rows), prompt, example.completion, CONTRAST_KIND, context=context))
    return rows


def sample_contrast_rows(train: Sequence[Example], ratio: float, *, seed: int) -> list[Example]:
    """The contrast rows of a seeded sample of ``ceil(ratio x len(train))`` training rows (``contrast_ratio``)."""
    picked = reservoir_sample(train, math.ceil(ratio * len(train)), seed=seed)
    return contrast_examples(picked, first_id=CONTRAST_FIRST_ID)
