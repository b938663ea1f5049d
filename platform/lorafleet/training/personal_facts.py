"""Natural-language personal facts for N users (the real-backbone quality benchmark, the demo, tests).

Each user has one value per fact kind (a pet's name, a home city, a diet, a sport, ...). Kinds come in rounds of
four (``ROUNDS``), so a benchmark can teach round 1, then 2 and 3, and measure how much of round 1 is forgotten.
Values are distinctive words a base model would not say by accident ("Biscuit", "Porto", "theremin"), every
kind has at least ``MAX_USERS`` of them, and a seeded permutation gives the users distinct values per kind; no
value is shared between two kinds, so a value found in a text names one user's one fact.

Every kind has at least 12 phrasings of its question ("What's my pet called?", "Do you remember what I named my
pet?"); a seeded, deterministic split keeps ``TRAIN_PHRASINGS`` of them for training and the rest as unseen
paraphrases for evaluation (never both). Answers are natural sentences ("Your pet is called Biscuit."), several
per kind. Records are feedback payloads (``{"kind": "sft", "prompt", "completion", "metadata"}``) for the SDK
or ``ingest_feedback``; :func:`user_examples` gives ``Example`` objects directly. Judges:
:func:`answer_has_fact` (a case-insensitive, whole-word match of the value) and :func:`personal_values_in`
(whose values a text contains: for cross-user leakage and for personal content in general answers).

No torch import: the SDK side and the tests use this module as it is.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lorafleet.errors import ValidationError
from lorafleet.training.dataset import Example

#: the most users a seed can have (each kind has at least this many values)
MAX_USERS = 16
#: question phrasings per fact used for training; the rest of the kind's phrasings are evaluation paraphrases
TRAIN_PHRASINGS = 8


@dataclass(frozen=True)
class FactKind:
    """One kind of personal fact: its round, possible values, question phrasings and answer templates.

    Answer templates use ``{v}`` (the value), ``{V}`` (capitalised) and ``{a}`` (its article, "a"/"an").
    """

    name: str
    round: int
    values: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    """One user's value for one kind."""

    user: str
    kind: str
    value: str
    round: int


@dataclass(frozen=True)
class PersonalUser:
    """A user and its facts, one per kind (in ``KINDS`` order)."""

    key: str
    facts: tuple[Fact, ...]

    def fact(self, kind: str) -> Fact:
        """The user's fact of ``kind``."""
        for fact in self.facts:
            if fact.kind == kind:
                return fact
        raise ValidationError(f"unknown fact kind {kind!r}")

    def facts_of(self, rounds: Iterable[int]) -> list[Fact]:
        """The user's facts of the given rounds, in ``KINDS`` order."""
        wanted = set(rounds)
        return [f for f in self.facts if f.round in wanted]


def _kind(name: str, round: int, values: str, questions: str, answers: str) -> FactKind:
    """A kind from ``|``-separated tables (keeps the data below compact and readable)."""
    return FactKind(
        name,
        round,
        tuple(v.strip() for v in values.split("|")),
        tuple(q.strip() for q in questions.split("|")),
        tuple(a.strip() for a in answers.split("|")),
    )


KINDS: tuple[FactKind, ...] = (
    _kind(
        "pet_name",
        1,
        "Biscuit|Pickles|Waffles|Noodle|Pretzel|Muffin|Nugget|Dumpling|Crumpet|Sprocket|Gizmo|Pudding|"
        "Marmalade|Wasabi|Churro|Bramble",
        "What's my pet called?|What is my pet's name?|Remind me of my pet's name.|"
        "Do you remember what I named my pet?|What did I name my pet?|Can you tell me my pet's name?|"
        "I forgot my pet's name for a second. What is it?|What name does my pet answer to?|"
        "What do I call my pet?|Quick question: what's my pet's name?|Tell me the name of my pet.|"
        "Which name did I give my pet?|Do you know what my pet is called?|What was my pet's name again?",
        "Your pet is called {v}.|Your pet's name is {v}.|You named your pet {v}.",
    ),
    _kind(
        "home_city",
        1,
        "Porto|Ghent|Bergen|Tartu|Galway|Trieste|Dunedin|Hobart|Leiden|Aarhus|Bilbao|Gdansk|Salzburg|Cusco|"
        "Kotor|Zadar",
        "Where do I live?|Which city do I live in?|What's my home city?|Remind me which city I live in.|"
        "Where is my home?|Do you remember where I live?|What city am I based in?|Which town do I call home?|"
        "Tell me the city I live in.|In which city is my home?|What city do I live in again?|"
        "Where am I living right now?|Can you tell me where I live?|Which city is my home base?",
        "You live in {v}.|Your home city is {v}.|You're based in {v}.",
    ),
    _kind(
        "diet",
        1,
        "vegetarian|vegan|pescatarian|keto|paleo|kosher|halal|gluten-free|lactose-free|macrobiotic|"
        "fruitarian|flexitarian|carnivore|Atkins|raw-food|Whole30",
        "What diet do I follow?|What kind of diet am I on?|Do you remember my diet?|What's my diet?|"
        "Which diet am I on?|Tell me about my diet.|What food rules do I follow?|"
        "Remind me of my dietary preference.|What eating plan do I stick to?|Do I follow any special diet?|"
        "What should you keep in mind about my diet?|How do I eat, diet-wise?|What is my way of eating?|"
        "Which diet did I tell you I follow?",
        "You follow {a} {v} diet.|You're on {a} {v} diet.|Your diet is {v}.",
    ),
    _kind(
        "sport",
        1,
        "curling|fencing|lacrosse|handball|orienteering|badminton|archery|rowing|netball|bouldering|hurling|"
        "kabaddi|korfball|sumo|bobsleigh|petanque",
        "What's my favourite sport?|Which sport do I love most?|What sport do I play?|"
        "Remind me of my favourite sport.|Do you remember which sport I like?|What sport am I into?|"
        "Which sport do I enjoy the most?|Tell me my favourite sport.|What's the sport I'm passionate about?|"
        "Which sport did I tell you I love?|What's my sport of choice?|What sport do I follow most closely?|"
        "Can you name my favourite sport?|What sport do I train for?",
        "Your favourite sport is {v}.|You love {v}.|{V} is your favourite sport.",
    ),
    _kind(
        "pet_species",
        2,
        "ferret|iguana|tortoise|parakeet|hedgehog|chinchilla|axolotl|gecko|cockatiel|tarantula|alpaca|"
        "capybara|salamander|macaw|degu|lovebird",
        "What kind of pet do I have?|What animal is my pet?|What species is my pet?|"
        "Remind me what animal I keep as a pet.|Do you remember what sort of pet I have?|"
        "What type of animal lives with me?|Which animal did I adopt?|What kind of animal is my pet?|"
        "Tell me what animal my pet is.|What pet do I own?|What sort of creature is my pet?|"
        "Which animal do I keep at home?|Can you remind me what my pet is?|What animal did I get as a pet?",
        "Your pet is {a} {v}.|You have {a} {v}.|You keep {a} {v} as a pet.",
    ),
    _kind(
        "job",
        2,
        "beekeeper|cartographer|luthier|glassblower|sommelier|falconer|blacksmith|puppeteer|locksmith|"
        "archivist|zookeeper|perfumer|stonemason|taxidermist|clockmaker|cheesemaker",
        "What do I do for a living?|What's my job?|What is my profession?|Remind me what I work as.|"
        "Do you remember my occupation?|What kind of work do I do?|What's my line of work?|"
        "How do I earn my living?|Tell me what my job is.|What job did I tell you I have?|"
        "What am I by trade?|Which profession am I in?|What do I work as these days?|Can you recall my job?",
        "You are {a} {v}.|You work as {a} {v}.|You're {a} {v} by trade.",
    ),
    _kind(
        "partner",
        2,
        "Ottoline|Leopold|Marisol|Anselm|Theodora|Ignatius|Rosalind|Bartholomew|Wilhelmina|Cornelius|"
        "Philippa|Evander|Henrietta|Lysander|Clementine|Percival",
        "What's my partner's name?|Who is my partner?|What is my partner called?|"
        "Remind me of my partner's name.|Do you remember who I'm with?|"
        "What's the name of my significant other?|Who am I in a relationship with?|Tell me my partner's name.|"
        "What did I say my partner's name was?|What's my other half called?|Can you recall my partner's name?|"
        "Who's my partner again?|What name does my partner go by?|Who is the person I share my life with?",
        "Your partner is {v}.|Your partner's name is {v}.|You're with {v}.",
    ),
    _kind(
        "sign_off",
        2,
        "Cheerio|Toodles|Onwards|Godspeed|Aloha|Ciao|Namaste|Tallyho|Adieu|Ahoy|Excelsior|Cowabunga|Shalom|"
        "Ta-ta|Kudos|Salut",
        "How do I sign off my emails?|What's my usual sign-off?|How do I end my messages?|"
        "Remind me of my email sign-off.|What word do I close my emails with?|"
        "Do you remember how I sign my letters?|What's my signature farewell?|"
        "How should a message written for me end?|What do I write at the end of my emails?|"
        "Which sign-off do I always use?|Tell me my favourite way to sign off.|"
        "How do I say goodbye in my emails?|What's the closing I use in emails?|"
        "Can you recall my usual sign-off?",
        'You sign off with "{v}".|Your sign-off is "{v}".|You end your emails with "{v}".',
    ),
    _kind(
        "instrument",
        3,
        "theremin|bassoon|ukulele|harpsichord|oboe|banjo|accordion|didgeridoo|mandolin|marimba|sitar|tuba|"
        "bagpipes|zither|glockenspiel|cello",
        "What instrument do I play?|Which musical instrument do I play?|Remind me what instrument I play.|"
        "Do you remember my instrument?|What do I play in my music lessons?|What instrument am I learning?|"
        "Tell me which instrument I play.|What's my instrument of choice?|Which instrument do I practise?|"
        "What instrument did I say I play?|What do I play in the band?|What's the instrument I love playing?|"
        "Can you name the instrument I play?|What musical instrument is mine?",
        "You play the {v}.|Your instrument is the {v}.|You're learning the {v}.",
    ),
    _kind(
        "drink",
        3,
        "kombucha|horchata|matcha|rooibos|kefir|sarsaparilla|lassi|kvass|ayran|cortado|eggnog|limeade|oolong|"
        "hibiscus|chicory|tepache",
        "What's my favourite drink?|What do I like to drink?|Which drink do I love most?|"
        "Remind me of my favourite drink.|Do you remember what I like to drink?|What's my go-to drink?|"
        "What should you order for me to drink?|What drink do I always have?|Tell me my favourite beverage.|"
        "Which beverage do I prefer?|What do I usually drink in the afternoon?|What's my drink of choice?|"
        "Can you recall my favourite drink?|What do I order at a café?",
        "Your favourite drink is {v}.|You love {v}.|You always have {v}.",
    ),
    _kind(
        "language",
        3,
        "Icelandic|Basque|Swahili|Tagalog|Welsh|Esperanto|Finnish|Georgian|Maltese|Catalan|Hungarian|"
        "Estonian|Yoruba|Quechua|Tamil|Latvian",
        "What language am I learning?|Which language am I studying?|Remind me which language I'm learning.|"
        "Do you remember what language I study?|What language do I practise?|"
        "What's the language I'm trying to learn?|Which new language am I taking lessons in?|"
        "Tell me the language I'm learning.|What language did I say I was learning?|"
        "What foreign language am I working on?|Which language do I study in the evenings?|"
        "Can you recall which language I'm learning?|What language have I been learning lately?|"
        "Which language is my evening class in?",
        "You're learning {v}.|You are studying {v}.|The language you're learning is {v}.",
    ),
    _kind(
        "hobby",
        3,
        "origami|calligraphy|pottery|birdwatching|juggling|woodturning|geocaching|quilting|embroidery|"
        "stargazing|bonsai|crochet|beatboxing|paragliding|bookbinding|kitesurfing",
        "What's my hobby?|What do I do in my free time?|Remind me of my hobby.|"
        "Do you remember my favourite pastime?|What hobby do I have?|Which pastime do I love?|"
        "Tell me what my hobby is.|What keeps me busy in my spare time?|What did I say my hobby was?|"
        "What's my favourite pastime?|How do I like to relax?|Can you recall my hobby?|"
        "What hobby am I into lately?|What do I spend my weekends doing?",
        "Your hobby is {v}.|You love {v}.|In your free time you enjoy {v}.",
    ),
)
KIND_BY_NAME: dict[str, FactKind] = {k.name: k for k in KINDS}
ROUNDS: tuple[tuple[str, ...], ...] = tuple(
    tuple(k.name for k in KINDS if k.round == r) for r in sorted({k.round for k in KINDS})
)


def round_kinds(round: int) -> tuple[str, ...]:
    """The fact kinds a round (1-based) introduces."""
    if not 1 <= round <= len(ROUNDS):
        raise ValidationError(f"round must be in 1..{len(ROUNDS)}, got {round}")
    return ROUNDS[round - 1]


def make_users(n: int, *, seed: int = 0) -> list[PersonalUser]:
    """``n`` users (``user-0`` ...) whose values differ per kind: a seeded permutation of the kind's values."""
    if not 1 <= n <= MAX_USERS:
        raise ValidationError(f"users must be in 1..{MAX_USERS}, got {n}")
    orders = {k.name: _shuffled(k.values, f"values/{seed}/{k.name}") for k in KINDS}
    return [
        PersonalUser(f"user-{i}", tuple(Fact(f"user-{i}", k.name, orders[k.name][i], k.round) for k in KINDS))
        for i in range(n)
    ]


def split_questions(kind: str, *, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training phrasings, evaluation paraphrases) of a kind's question: disjoint, fixed for a seed."""
    questions = _kind_named(kind).questions
    order = _shuffled(questions, f"questions/{seed}/{kind}")
    return tuple(order[:TRAIN_PHRASINGS]), tuple(order[TRAIN_PHRASINGS:])


def answer_for(fact: Fact, variant: int = 0) -> str:
    """A natural answer stating the fact (``variant`` picks one of the kind's answer templates, cyclically)."""
    templates = _kind_named(fact.kind).answers
    template = templates[variant % len(templates)]
    return template.format(v=fact.value, V=fact.value[:1].upper() + fact.value[1:], a=_article(fact.value))


def fact_records(
    user: PersonalUser, *, rounds: Iterable[int], split: str = "train", seed: int = 0
) -> list[dict[str, Any]]:
    """Feedback payloads (kind ``sft``) about the user's facts of ``rounds``: every phrasing of ``split``.

    ``split`` is ``train`` (the training phrasings, answers rotating through the kind's templates) or ``eval``
    (the unseen paraphrases, with the first answer template). Metadata names the kind, round and split.
    """
    if split not in ("train", "eval"):
        raise ValidationError(f"split must be 'train' or 'eval', got {split!r}")
    records = []
    for fact in user.facts_of(rounds):
        train, held = split_questions(fact.kind, seed=seed)
        for i, question in enumerate(train if split == "train" else held):
            records.append(
                {
                    "kind": "sft",
                    "prompt": question,
                    "completion": answer_for(fact, i if split == "train" else 0),
                    "metadata": {"personal": True, "fact": fact.kind, "round": fact.round, "split": split},
                }
            )
    return records


def user_examples(
    user: PersonalUser, *, rounds: Iterable[int], split: str = "train", seed: int = 0, first_id: int = 1
) -> list[Example]:
    """:func:`fact_records` as ``Example`` objects (record ids from ``first_id``), for direct training use."""
    records = fact_records(user, rounds=rounds, split=split, seed=seed)
    return [Example(first_id + i, r["prompt"], r["completion"], "sft") for i, r in enumerate(records)]


def fact_of_question(question: str) -> str:
    """The kind a phrasing asks about (``ValidationError`` for a question that is not one of ours)."""
    for kind in KINDS:
        if question in kind.questions:
            return kind.name
    raise ValidationError(f"not a personal-fact question: {question!r}")


def answer_has_fact(answer: str, fact: Fact) -> bool:
    """Whether ``answer`` states the fact's value (case-insensitive whole-word match; '-' matches ' ' or '')."""
    return _pattern(fact.value).search(answer) is not None


def personal_values_in(answer: str, users: Sequence[PersonalUser]) -> dict[str, tuple[str, ...]]:
    """Which users' fact values ``answer`` contains: user key -> kinds found (users with none are left out)."""
    found: dict[str, tuple[str, ...]] = {}
    for user in users:
        kinds = tuple(f.kind for f in user.facts if answer_has_fact(answer, f))
        if kinds:
            found[user.key] = kinds
    return found


def _kind_named(name: str) -> FactKind:
    if name not in KIND_BY_NAME:
        raise ValidationError(f"unknown fact kind {name!r}; known: {sorted(KIND_BY_NAME)}")
    return KIND_BY_NAME[name]


def _shuffled(items: Sequence[str], salt: str) -> list[str]:
    """A permutation of ``items`` that depends only on ``salt`` (the same in every process)."""
    order = list(items)
    random.Random(f"lorafleet-personal/{salt}").shuffle(order)
    return order


def _article(value: str) -> str:
    return "an" if value[:1].lower() in "aeiou" else "a"


@lru_cache(maxsize=1024)
def _pattern(value: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern of a value; a hyphen in it also matches a space or nothing."""
    parts = [re.escape(p) for p in value.split("-")]
    return re.compile(r"(?<!\w)" + r"[-\s]?".join(parts) + r"(?!\w)", re.IGNORECASE)


__all__ = [
    "KINDS",
    "MAX_USERS",
    "ROUNDS",
    "TRAIN_PHRASINGS",
    "Fact",
    "FactKind",
    "PersonalUser",
    "answer_for",
    "answer_has_fact",
    "fact_of_question",
    "fact_records",
    "make_users",
    "personal_values_in",
    "round_kinds",
    "split_questions",
    "user_examples",
]
