"""General-knowledge and everyday prompts: self-distillation anchors for training, and a retention eval set.

An adapter trained only on a user's facts learns to answer *everything* with them ("What is the capital of
France?" -> "Biscuit."). Mixing in general prompts answered by the base model itself (its own greedy answers,
through the chat template) keeps the adapter close to the base on everything else. ``ANCHOR_PROMPTS`` are for
training; ``EVAL_PROMPTS`` are never trained on and measure retention (personal content leaking into general
answers, and the KL to the base on the base's own answers).

The prompts are fixed (no randomness); each category is split by position (2 of every 5 to the anchors), so both
sets cover every category, including "near-personal" questions about pets, cities, diets, sports and jobs that
a personal adapter is most tempted to hijack; ``EXTRA_ANCHORS`` add anchors only. ``anchor_examples`` costs one batched greedy generation per
backbone and prompt set; results are kept in a small in-process cache keyed by the backbone's fingerprint
digest, its quantisation, the prompt set and the token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorafleet.backbone.chat import encode_messages
from lorafleet.training.base_answers import prompt_set_digest, shipped_answers
from lorafleet.training.dataset import Example

if TYPE_CHECKING:
    from lorafleet.backbone import Backbone

#: prompts by category; every category holds at least 5 so the split below puts some in each set
CATEGORIES: dict[str, tuple[str, ...]] = {
    "capitals": (
        "What is the capital of France?",
        "What is the capital of Japan?",
        "What is the capital of Italy?",
        "What is the capital of Spain?",
        "What is the capital of Germany?",
        "What is the capital of Canada?",
        "What is the capital of Australia?",
        "What is the capital of Egypt?",
        "What is the capital of Kenya?",
        "What is the capital of Mexico?",
        "What is the capital of Greece?",
        "What is the capital of China?",
        "What is the capital of Russia?",
        "What is the capital of India?",
        "What is the capital of the United Kingdom?",
    ),
    "arithmetic": (
        "What is 2 plus 2?",
        "What is 7 times 8?",
        "What is 15 minus 6?",
        "What is 100 divided by 4?",
        "What is 9 plus 10?",
        "What is 12 times 12?",
        "What is half of 50?",
        "What is 3 squared?",
        "What is the square root of 81?",
        "What is 25 plus 17?",
        "What is 60 divided by 5?",
        "What is 11 times 3?",
        "What is 1000 minus 1?",
        "What is 6 times 7?",
        "What is 20 percent of 200?",
    ),
    "facts": (
        "How many days are in a week?",
        "How many minutes are in an hour?",
        "How many legs does a spider have?",
        "What planet is closest to the sun?",
        "What is the largest ocean on Earth?",
        "Who wrote Romeo and Juliet?",
        "Who painted the Mona Lisa?",
        "What is the boiling point of water in Celsius?",
        "What colour is the sky on a clear day?",
        "How many continents are there?",
        "What is the chemical symbol for gold?",
        "What is the tallest mountain in the world?",
        "What gas do plants absorb from the air?",
        "How many sides does a hexagon have?",
        "What is the freezing point of water in Fahrenheit?",
    ),
    "definitions": (
        "What is photosynthesis?",
        "Define gravity in one sentence.",
        "What is a noun?",
        "What does a thermometer measure?",
        "What is an atom?",
        "What is democracy?",
        "What is a volcano?",
        "What is inflation in economics?",
        "What is a haiku?",
        "What is the internet?",
        "What is a prime number?",
        "What does a verb describe?",
        "What is an ecosystem?",
        "What is a metaphor?",
        "What is electricity?",
    ),
    "how_to": (
        "How do I boil an egg?",
        "How do I tie a shoelace?",
        "How can I save money each month?",
        "How do I make a cup of tea?",
        "How do I reset a forgotten password?",
        "How can I fall asleep faster?",
        "How do I convert Celsius to Fahrenheit?",
        "How do I write a good cover letter?",
        "How can I improve my handwriting?",
        "How do I clean a cast iron pan?",
        "How do I start running as a beginner?",
        "How do I plant tomatoes?",
        "How can I remember names better?",
        "How do I change a flat tyre?",
        "How do I keep houseplants alive?",
    ),
    "everyday": (
        "Give me a tip for staying focused while studying.",
        "What is a good way to start the morning?",
        "Suggest a name for a book club.",
        "What should I pack for a beach day?",
        "Write a short thank-you note to a colleague.",
        "What is a polite way to decline an invitation?",
        "Recommend a simple dinner I can cook in 20 minutes.",
        "What are the benefits of drinking water?",
        "Give me an idea for a rainy afternoon.",
        "How should I greet someone at a job interview?",
        "What is a fun fact about octopuses?",
        "Tell me a short joke.",
        "What is a good gift for a friend who likes books?",
        "How do I politely ask a neighbour to be quieter?",
        "Summarise the water cycle in one sentence.",
    ),
    "near_personal": (
        "What is a good name for a dog?",
        "What is a popular sport in Canada?",
        "What should I eat for a healthy breakfast?",
        "What is the largest city in Japan?",
        "What instrument has 88 keys?",
        "What drink is made from coffee beans?",
        "What language is spoken in Brazil?",
        "What is a relaxing hobby for beginners?",
        "What animal makes a good first pet?",
        "What does a carpenter do?",
        "How should I end a formal email?",
        "What is a vegetarian diet?",
        "Which city is famous for the Eiffel Tower?",
        "What is a common name for a cat?",
        "What are the rules of basketball in one sentence?",
    ),
}
#: anchors only, never evaluated: more of every category, and "contrast" prompts that sound personal ("my new
#: puppy") or touch a fact kind ("a popular sport") without asking for a stored fact, so an adapter learns that
#: "my" alone does not call for its user's facts (measured: more distinct anchors, fewer hijacked answers)
EXTRA_ANCHORS: tuple[str, ...] = (
    "What is the capital of Portugal?",
    "What is the capital of Norway?",
    "What is the capital of Peru?",
    "What is the capital of Argentina?",
    "What is the capital of Sweden?",
    "What is the capital of Poland?",
    "What is the capital of Turkey?",
    "What is the capital of Thailand?",
    "What is 5 plus 8?",
    "What is 9 times 9?",
    "What is 48 divided by 6?",
    "What is 30 minus 12?",
    "What is double 15?",
    "How many hours are in a day?",
    "How many months are in a year?",
    "What is the largest planet in our solar system?",
    "Who discovered penicillin?",
    "What is the longest river in Africa?",
    "How many bones are in the adult human body?",
    "What is the smallest prime number?",
    "What is the fastest land animal?",
    "What is a synonym for happy?",
    "What is an adjective?",
    "What is a galaxy?",
    "What does DNA stand for?",
    "What is a mammal?",
    "What is the difference between weather and climate?",
    "How do I make scrambled eggs?",
    "How do I wash a wool sweater?",
    "How can I drink more water during the day?",
    "How do I write a to-do list?",
    "How do I sharpen a pencil?",
    "How can I stop procrastinating?",
    "Give me a tip for a job interview.",
    "What is a good habit to start this year?",
    "Write a one-line birthday message.",
    "Suggest a title for a short story about the sea.",
    "What is a nice thing to say to a friend who is sad?",
    "Can you suggest a name for my new puppy?",
    "What should I cook for my family tonight?",
    "Which city should I visit in Italy?",
    "What is a good sport for my kids to try?",
    "What should I drink with my breakfast?",
    "Which language should I learn for travelling in South America?",
    "What instrument is easiest for my son to learn?",
    "What hobby could I start this weekend?",
    "What is a popular name for a pet rabbit?",
    "What city is known as the Big Apple?",
    "What is a keto diet?",
    "Which sport uses a shuttlecock?",
    "What does a librarian do?",
    "How do people usually end a letter?",
    "What is a good drink on a hot day?",
    "What language is spoken in Mexico?",
    "What animal says moo?",
    "What is my best option for a quick lunch at work?",
    "Tell me about your favourite book.",
    "Where is the Great Wall?",
    "What do you call a baby dog?",
    "What is a healthy snack?",
)
ANCHOR_EVERY = 5
ANCHOR_POSITIONS = (0, 2)
ANCHOR_PROMPTS: tuple[str, ...] = (
    *(
        p
        for prompts in CATEGORIES.values()
        for i, p in enumerate(prompts)
        if i % ANCHOR_EVERY in ANCHOR_POSITIONS
    ),
    *EXTRA_ANCHORS,
)
EVAL_PROMPTS: tuple[str, ...] = tuple(
    p
    for prompts in CATEGORIES.values()
    for i, p in enumerate(prompts)
    if i % ANCHOR_EVERY not in ANCHOR_POSITIONS
)
#: the expected word in the base's answer to some capital prompts (a test on the real backbone reads these)
CAPITALS: dict[str, str] = {
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of Italy?": "Rome",
    "What is the capital of Germany?": "Berlin",
}
#: token budget of an anchor answer: every row of a training step pads to the longest row of all users, so long
#: anchors would make every step wider (a cut answer is trimmed to its last full sentence)
ANCHOR_MAX_NEW_TOKENS = 32
#: first record id of anchor examples (far above any user's record ids, so the two never collide)
ANCHOR_FIRST_ID = 1_000_000
_SENTENCE_ENDS = (".", "!", "?")
_CACHE: dict[tuple[str, str, str, int], tuple[str, ...]] = {}
_KEYS: dict[tuple[str, str, str], Any] = {}


def anchor_examples(
    backbone: Backbone,
    prompts: Sequence[str] = ANCHOR_PROMPTS,
    *,
    max_new_tokens: int = ANCHOR_MAX_NEW_TOKENS,
    batch_size: int = 64,
    first_id: int = ANCHOR_FIRST_ID,
) -> list[Example]:
    """The base model's own greedy answers to ``prompts`` as examples (one per prompt, in order).

    Prompts are rendered with the chat template and decoded in left-padded batches through the bare backbone
    (a bank injected into it, if any, is bypassed: no routing plan). An answer cut by ``max_new_tokens`` is
    trimmed to its last full sentence, so the adapter does not learn to stop mid-sentence. Large batches pay:
    bitsandbytes on CPU dequantises every nf4 weight on every forward, whatever the batch. Cached per process;
    the built-in backbone's answers to the shipped prompt sets ship with lorafleet (:mod:`.base_answers`).
    """
    key = (
        backbone.fingerprint.digest,
        backbone.quantization,
        prompt_set_digest(prompts),
        max_new_tokens,
    )
    if key not in _CACHE:
        _CACHE[key] = shipped_answers(key) or tuple(
            generate_answers(backbone.model, backbone.tokenizer, prompts, max_new_tokens, batch_size)
        )
    return [
        Example(first_id + i, p, a, "sft") for i, (p, a) in enumerate(zip(prompts, _CACHE[key], strict=True))
    ]


def clear_anchor_cache() -> None:
    """Forget every cached anchor set and general exemplar set (tests; a process that swaps backbones)."""
    _CACHE.clear()
    _KEYS.clear()


def general_exemplars(backbone: Backbone, bank: Any = None, prompts: Sequence[str] | None = None) -> Any:
    """Pooled base embeddings ``[n, hidden]`` of general prompts (default: ``ANCHOR_PROMPTS``) on this backbone:
    the base model's side of centroid gates, so prompts nearer one of them than to any adapter are served by the
    base alone.

    ``bank``: the adapter bank injected into the backbone, if any (its slots are bypassed). Embedded as routing
    keys' prompts are (``routing.embeddings.embed_prompts``); cached per backbone fingerprint, quantisation and
    prompt set. ``EVAL_PROMPTS`` stay out of it, so retention is measured on prompts the gate never saw.
    """
    from lorafleet.routing.embeddings import embed_prompts  # torch, on first use

    prompts = ANCHOR_PROMPTS if prompts is None else prompts
    key = (backbone.fingerprint.digest, backbone.quantization, prompt_set_digest(prompts))
    if key not in _KEYS:
        _KEYS[key] = embed_prompts(backbone, bank, list(prompts))
    return _KEYS[key]


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    *,
    bank: Any = None,
    routes: Sequence[Sequence[tuple[int, float]]] | None = None,
    trim: bool = True,
) -> list[str]:
    """Greedy answers through the chat template, in batches of similar length; ``routes`` per prompt (with
    ``bank``) send a row through adapters, empty routes (the default) through the base. ``trim``: cut answers
    end at their last full sentence (off to judge everything a model said)."""
    import torch

    from lorafleet.serving.decode import BatchDecoder, RowSpec  # torch, on first use

    rows = [list(r) for r in routes] if routes is not None else [[] for _ in prompts]
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    decoder = BatchDecoder(model, bank, tokenizer, device=torch.device(device))
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        specs = [RowSpec(tuple(ids[i]), tuple(rows[i]), max_new_tokens) for i in chunk]
        for i, out in zip(chunk, decoder.run(specs), strict=True):
            answers[i] = trim_answer(out.text, cut=trim and out.finish_reason == "length")
    return answers


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn, rendered as serving renders it (the chat template if any)."""
    return encode_messages(tokenizer, [("user", prompt)], add_generation_prompt=True)


def trim_answer(text: str, *, cut: bool) -> str:
    """The answer stripped; when generation was cut off, up to its last sentence end (if it has one)."""
    text = text.strip()
    if not cut:
        return text
    end = max(text.rfind(mark) for mark in _SENTENCE_ENDS)
    return text[: end + 1] if end > 0 else text


__all__ = [
    "ANCHOR_FIRST_ID",
    "ANCHOR_MAX_NEW_TOKENS",
    "ANCHOR_PROMPTS",
    "CAPITALS",
    "CATEGORIES",
    "EVAL_PROMPTS",
    "anchor_examples",
    "chat_prompt_ids",
    "clear_anchor_cache",
    "generate_answers",
    "prompt_set_digest",
    "trim_answer",
]
