"""The built-in backbone's own greedy answers to the anchor and probe prompts, shipped with lorafleet.

Training anchors (:mod:`lorafleet.training.general_prompts`) and QA's probe (:mod:`lorafleet.qa.probe`) are the base
model's greedy answers to fixed prompts. Generating them is the slowest part of a fresh process's first job: on 2
CPU cores the 102 anchors take 18-23 s and the 32 probe answers about 9 s, paid by every new trainer process
(a service's first training job and its first QA job, every ``make demo``). The answers depend only on the
backbone's weights, its quantisation, the prompts and the token budget, so those of ``builtin:smollm2-135m`` in
nf4, the product's default, ship in ``smollm2_base_answers.json``, keyed by all four; every other backbone,
quantisation, prompt set or budget is generated as before. They were decoded on a CPU and serve on any device: a GPU
might break a near-tie between two tokens the other way in a few answers, which changes nothing an anchor or the probe
is for (the base's own kind of answer).

``infra/ship_base_answers.py`` writes the file (after a prompt set changes, or when the converted backbone's
fingerprint does); a test checks that it belongs to the backbone ``build_smollm2_backbone`` makes and that its
answers are that model's greedy answers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

#: the shipped answers of ``builtin:smollm2-135m`` (nf4)
SHIPPED_ANSWERS = Path(__file__).with_name("smollm2_base_answers.json")

#: (fingerprint digest, quantisation, prompt set sha256, max new tokens)
AnswerKey = tuple[str, str, str, int]


def prompt_set_digest(prompts: Sequence[str]) -> str:
    """sha256 over the prompts in order (a cache key part, and a name for the set in reports)."""
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()


@functools.cache
def _shipped(path: Path) -> dict[AnswerKey, tuple[str, ...]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        (
            data["fingerprint"],
            data["quantization"],
            prompt_set_digest(s["prompts"]),
            s["max_new_tokens"],
        ): tuple(s["answers"])
        for s in data["sets"]
    }


def shipped_answers(key: AnswerKey, path: Path = SHIPPED_ANSWERS) -> tuple[str, ...] | None:
    """The shipped answers for ``key``, or None when lorafleet ships none for it."""
    return _shipped(path).get(key)


def answer_sets_json(
    *, fingerprint: str, quantization: str, sets: Sequence[tuple[Sequence[str], int, Sequence[str]]]
) -> str:
    """The shipped file's text for ``sets`` of (prompts, max new tokens, answers)."""
    return (
        json.dumps(
            {
                "about": "greedy answers of this backbone to lorafleet's anchor and probe prompts "
                "(lorafleet.training.base_answers; written by infra/ship_base_answers.py)",
                "fingerprint": fingerprint,
                "quantization": quantization,
                "sets": [
                    {"max_new_tokens": budget, "prompts": list(prompts), "answers": list(answers)}
                    for prompts, budget, answers in sets
                ],
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )


__all__ = ["SHIPPED_ANSWERS", "AnswerKey", "answer_sets_json", "prompt_set_digest", "shipped_answers"]
