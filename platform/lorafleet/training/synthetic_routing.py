"""Three distinguishable synthetic tasks for routing tests and the routing benchmark (no torch, seeded).

- ``pig-latin``: "translate to pig latin: river stone" -> "iverray onestay"
- ``reverse``: "reverse: cloudhouse" -> "esuohduolc"
- ``favourite``: "Q: what is the favourite food of alice?" -> "A: alice likes bread" (a fixed table)

Each task has three prompt templates and draws its content from a shared word list, so the tasks differ in
format and wording (what a pooled base embedding sees) rather than in vocabulary alone. Holdout prompts never
occur in the training set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

from lorafleet.training.dataset import Example

TASKS: tuple[str, ...] = ("pig-latin", "reverse", "favourite")
WORDS: tuple[str, ...] = tuple(
    "apple river stone cloud house green table music light paper water night bread tiger smile garden "
    "window silver dance ocean pencil forest winter candle rocket yellow planet button mirror castle".split()
)
NAMES: tuple[str, ...] = tuple("alice bob carol dave erin frank grace heidi ivan judy oscar peggy".split())
THINGS: tuple[str, ...] = ("colour", "food", "song", "movie", "book", "sport", "city", "animal")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "pig-latin": ("translate to pig latin: {x}", "pig latin please: {x}", "say it in pig latin: {x}"),
    "reverse": ("reverse: {x}", "spell backwards: {x}", "write this in reverse: {x}"),
    "favourite": (
        "Q: what is the favourite {thing} of {name}?",
        "Q: which {thing} does {name} like best?",
        "Q: tell me {name}'s favourite {thing}.",
    ),
}
#: other phrasings of the same tasks, never used for training: how a gate copes with wording it has not seen
UNSEEN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "pig-latin": ("convert into pig latin: {x}",),
    "reverse": ("backwards please: {x}",),
    "favourite": ("Q: {name} prefers which {thing}?",),
}


def pig_latin(word: str) -> str:
    """Move the leading consonants to the end and add "ay" ("stone" -> "onestay")."""
    first_vowel = next((i for i, c in enumerate(word) if c in "aeiou"), 0)
    return word[first_vowel:] + word[:first_vowel] + "ay"


def favourite(name: str, thing: str) -> str:
    """The fixed answer of the favourite task (a hash of the pair picks a word)."""
    digest = hashlib.sha256(f"{name}/{thing}".encode()).digest()
    return WORDS[digest[0] % len(WORDS)]


def _pig_latin(rng: random.Random, templates: Sequence[str]) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 3))
    prompt = rng.choice(templates).format(x=" ".join(words))
    return prompt, " ".join(pig_latin(w) for w in words)


def _reverse(rng: random.Random, templates: Sequence[str]) -> tuple[str, str]:
    text = rng.choice(WORDS) + rng.choice(WORDS)
    return rng.choice(templates).format(x=text), text[::-1]


def _favourite(rng: random.Random, templates: Sequence[str]) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    prompt = rng.choice(templates).format(name=name, thing=thing)
    return prompt, f"A: {name} likes {favourite(name, thing)}"


_MAKERS: dict[str, Callable[[random.Random, Sequence[str]], tuple[str, str]]] = {
    "pig-latin": _pig_latin,
    "reverse": _reverse,
    "favourite": _favourite,
}


def task_split(
    task: str, *, n_train: int, n_holdout: int, seed: int = 0, unseen_phrasing: bool = False
) -> tuple[list[Example], list[Example]]:
    """``n_train`` training and ``n_holdout`` holdout examples of one task; no holdout prompt is in train.

    ``unseen_phrasing`` draws the holdout from ``UNSEEN_TEMPLATES`` instead of the training templates.
    """
    rng = random.Random(f"lorafleet-routing/{task}/{seed}")
    make = _MAKERS[task]
    seen: set[str] = set()
    train: list[Example] = []
    holdout: list[Example] = []
    holdout_templates = UNSEEN_TEMPLATES[task] if unseen_phrasing else TEMPLATES[task]
    for target, size, templates in (
        (train, n_train, TEMPLATES[task]),
        (holdout, n_holdout, holdout_templates),
    ):
        for _ in range(50 * size):  # bounded: stops long before when the space is large enough
            if len(target) == size:
                break
            prompt, completion = make(rng, templates)
            if prompt + "\n" not in seen:
                seen.add(prompt + "\n")
                target.append(Example(len(seen), prompt + "\n", completion, "sft"))
    return train, holdout


def three_tasks(
    *, n_train: int = 64, n_holdout: int = 32, seed: int = 0, unseen_phrasing: bool = False
) -> dict[str, tuple[list[Example], list[Example]]]:
    """``{task: (train, holdout)}`` for the three tasks."""
    return {
        t: task_split(t, n_train=n_train, n_holdout=n_holdout, seed=seed, unseen_phrasing=unseen_phrasing)
        for t in TASKS
    }
