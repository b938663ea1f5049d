"""The probe set: general prompts, answered by the base model itself, that measure the backbone's general
behaviour; shipped with the project.

**Prompts.** ``lorafleet.training.general_prompts.EVAL_PROMPTS`` (capitals, arithmetic, facts, definitions,
how-to, everyday and near-personal questions), taken round-robin over their categories so that any prefix covers
every category. Not ``ANCHOR_PROMPTS``: those are trained on (the base's own answers to them are mixed into
every personal adapter's training rows), so an adapter keeps them by construction and a drift measured there
would understate what it did to everything else. ``EVAL_PROMPTS`` are never trained on and are not the
serving gate's general exemplars either, so they measure what an adapter does to prompts it has never seen.

**Completions.** The base model's own greedy answers to those prompts through the chat template (at most
``PROBE_MAX_NEW_TOKENS`` tokens, cut to the last full sentence: ``general_prompts.anchor_examples``, cached per
backbone). They are deterministic for a backbone (greedy), so the same ``PROBE_VERSION`` gives the same set on
every machine; the prompts are pinned by ``PROBE_SHA256`` and a report records both digests.

**Figure.** The probe loss of a configuration is the teacher-forced NLL of the base's answers; its *drift*
(``lorafleet.qa.rules.probe_rule``) is that loss minus the base model's own. A candidate that has learnt its
user's task without changing general behaviour keeps the base's answers likely (drift near 0); one that
answers everything with its user's facts, or diverged, makes them unlikely.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.backbone.tiny import is_tiny_dir
from lorafleet.errors import ValidationError
from lorafleet.training.dataset import Example
from lorafleet.training.general_prompts import CATEGORIES, EVAL_PROMPTS, anchor_examples

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank
    from lorafleet.backbone import Backbone

PROBE_VERSION = "probe/2"
#: the probe drift a candidate may cause (``QAPolicy.epsilon_probe`` left to the backbone), by measurement
#: (tests/benchmarks/bench_qa_calibration.py): on SmolLM2-135M-Instruct good adapters moved the probe 0.06-0.10
#: nats and harmful ones (no anchors, lr 1e-2) 0.46-1.9, so 0.25 separates them; a pretrained backbone with no
#: measurement of its own gets the same. The built-in tiny backbone is random-init: every trained adapter
#: lowers its probe 0.4-0.5 nats (it learns byte statistics), so it needs 0.75
PRETRAINED_EPSILON_PROBE = 0.25
RANDOM_INIT_EPSILON_PROBE = 0.75
#: at most this many tokens per base answer (cut to the last full sentence)
PROBE_MAX_NEW_TOKENS = 32
#: record ids of probe examples (above anchors' and users' ids)
PROBE_FIRST_ID = 2_000_000
#: sha256 of the full prompt list (see ``probe_digest``); changing the prompts must change PROBE_VERSION too
PROBE_SHA256 = "51eac9236bf6b4912a35f949f70aaa29aceab9ab7969d2acf18380b6e6bdd999"


def _ordered() -> tuple[str, ...]:
    """``EVAL_PROMPTS`` round-robin over their categories (category order, then position in the category)."""
    eval_set = set(EVAL_PROMPTS)
    per_category = [[p for p in prompts if p in eval_set] for prompts in CATEGORIES.values()]
    out: list[str] = []
    for i in range(max(len(c) for c in per_category)):
        out += [c[i] for c in per_category if i < len(c)]
    return tuple(out)


PROBE_PROMPTS: tuple[str, ...] = _ordered()
PROBE_MAX_SIZE = len(PROBE_PROMPTS)


def probe_epsilon_for(checkpoint: Path) -> float:
    """The probe bound measured for the backbone in ``checkpoint`` (``Backbone.path``): the pretrained one, or the
    random-init one for the built-in tiny backbone."""
    return RANDOM_INIT_EPSILON_PROBE if is_tiny_dir(checkpoint) else PRETRAINED_EPSILON_PROBE


def probe_prompts(size: int = 32) -> list[str]:
    """The first ``size`` probe prompts (every category in any prefix of at least 7)."""
    if not 1 <= size <= PROBE_MAX_SIZE:
        raise ValidationError(f"probe size must be in 1..{PROBE_MAX_SIZE}, got {size}")
    return list(PROBE_PROMPTS[:size])


def probe_examples(backbone: Backbone, size: int = 32, *, bank: AdapterBank | None = None) -> list[Example]:
    """The first ``size`` probe prompts with the base model's greedy answers on ``backbone`` (cached);
    ``bank``: the adapter bank injected into it, if any (bypassed)."""
    with nullcontext() if bank is None else bank.base_only():
        return anchor_examples(
            backbone, probe_prompts(size), max_new_tokens=PROBE_MAX_NEW_TOKENS, first_id=PROBE_FIRST_ID
        )


def probe_digest(size: int = PROBE_MAX_SIZE) -> str:
    """sha256 over the first ``size`` prompts (recorded in every report)."""
    return hashlib.sha256(json.dumps(probe_prompts(size), separators=(",", ":")).encode("utf-8")).hexdigest()


def answers_digest(examples: list[Example]) -> str:
    """sha256 over the probe's prompts and the base answers of one backbone (recorded in every report)."""
    pairs = [[e.prompt, e.completion] for e in examples]
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode("utf-8")).hexdigest()


__all__ = [
    "PROBE_MAX_NEW_TOKENS",
    "PROBE_MAX_SIZE",
    "PROBE_PROMPTS",
    "PROBE_SHA256",
    "PROBE_VERSION",
    "answers_digest",
    "probe_digest",
    "probe_examples",
    "probe_prompts",
]
