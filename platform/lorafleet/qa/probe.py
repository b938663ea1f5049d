"""The probe set: fixed, patterned text that measures the backbone's general behaviour, shipped with the project.

The set is generated, not stored: a seeded ``random.Random`` fills five families of patterns (counting,
the alphabet, days of the week, simple sentences, repetition), the prompt is the start of a line and the
completion its continuation. The same ``PROBE_VERSION`` always yields the same examples on every machine (a
test pins ``PROBE_SHA256``), so probe losses in reports of different days compare. QA measures how far a
configuration moves the probe loss from the base model's; an adapter that has learned its user's task without
changing the model's general behaviour moves it little.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from lorafleet.errors import ValidationError
from lorafleet.training.dataset import Example

PROBE_VERSION = "probe/1"
PROBE_MAX_SIZE = 128
#: sha256 of the full set (see ``probe_digest``); changing the generator must change PROBE_VERSION too
PROBE_SHA256 = "b7a843ef9471a9f621098e746f2db22f2717e8a149abb1084add0b92394230ab"

_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_ANIMALS = ("cat", "dog", "bird", "horse", "fox", "cow", "sheep", "duck")
_PLACES = ("mat", "rug", "chair", "bed", "box", "step", "wall", "roof")
_COLOURS = ("red", "blue", "green", "black", "white", "brown")


def _counting(rng: random.Random) -> tuple[str, str]:
    start = rng.randrange(1, 60)
    return f"Count: {start} {start + 1} {start + 2}", f" {start + 3} {start + 4} {start + 5}\n"


def _alphabet(rng: random.Random) -> tuple[str, str]:
    start = rng.randrange(0, 20)
    letters = [chr(ord("a") + start + i) for i in range(6)]
    return "Letters: " + " ".join(letters[:3]), " " + " ".join(letters[3:]) + "\n"


def _days(rng: random.Random) -> tuple[str, str]:
    start = rng.randrange(0, 7)
    days = [_DAYS[(start + i) % 7] for i in range(4)]
    return "Days: " + ", ".join(days[:2]), ", " + ", ".join(days[2:]) + "\n"


def _sentence(rng: random.Random) -> tuple[str, str]:
    animal, place, colour = rng.choice(_ANIMALS), rng.choice(_PLACES), rng.choice(_COLOURS)
    return f"The {colour} {animal} sat on the", f" {place}.\n"


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_NUMBERS)
    return f"Say it three times: {word} {word}", f" {word}\n"


_FAMILIES: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _counting,
    _alphabet,
    _days,
    _sentence,
    _repeat,
)


def probe_examples(size: int = 32) -> list[Example]:
    """The first ``size`` examples of the probe set (families interleaved, so any prefix covers all five)."""
    if not 1 <= size <= PROBE_MAX_SIZE:
        raise ValidationError(f"probe size must be in 1..{PROBE_MAX_SIZE}, got {size}")
    return _all_examples()[:size]


def probe_digest(size: int = PROBE_MAX_SIZE) -> str:
    """sha256 over the prompts and completions of the first ``size`` examples (recorded in every report)."""
    pairs = [[e.prompt, e.completion] for e in probe_examples(size)]
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode("utf-8")).hexdigest()


def _all_examples() -> list[Example]:
    rng = random.Random(f"lorafleet-{PROBE_VERSION}")
    out: list[Example] = []
    seen: set[str] = set()
    for index in range(PROBE_MAX_SIZE):
        family = _FAMILIES[index % len(_FAMILIES)]
        for _ in range(50):  # a new prompt while the family has one left; a repeat once it has not
            prompt, completion = family(rng)
            if prompt not in seen:
                break
        seen.add(prompt)
        out.append(Example(index + 1, prompt, completion, "probe"))
    return out


__all__ = ["PROBE_MAX_SIZE", "PROBE_SHA256", "PROBE_VERSION", "probe_digest", "probe_examples"]
