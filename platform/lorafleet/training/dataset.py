"""Training examples from feedback records: the kind rules, the holdout split, replay sampling and encoding.

Rules (one place, so the trainer, continual learning and QA agree):

- ``sft`` -> the completion is the target; a record with ``messages`` instead trains its last (assistant) turn,
  with the turns before it as the example's ``context`` and the last user turn's content as its ``prompt``
  (what dedupe, displays and routing keys use);
- ``preference`` -> the chosen answer is the target (SFT on chosen); ``rejected`` is kept on the example for
  preference objectives but not trained on here;
- ``rating`` -> the response is the target when ``score >= rating_threshold``; lower ratings are excluded and
  counted (``excluded["rating_below_threshold"]``). When the job trains preferences (``dpo_weight`` > 0), a
  low-rated response of a prompt that also has high-rated ones becomes their rejected answer instead: each
  high-rated response of the prompt is paired with the prompt's lowest-rated response (a preference pair, trained
  with DPO); only low ratings without a high-rated answer to pair with are excluded;
- a record repeated (same content hash) counts once; malformed payloads and unknown kinds are counted, not
  raised, so one odd row cannot stop a user's job.

Encoding renders the context (a prompt-based example is one user turn) with the backbone's chat template, or the
plain format without one (``lorafleet.backbone.chat``), exactly as serving renders a request, and ends every
target with the end-of-turn token serving stops at (SmolLM2's ``<|im_end|>``, the eos without a template).

The holdout split is a pure function of each record's content hash, so a record never moves between train and
holdout when more records arrive, and the same feedback gives the same split on every machine.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from lorafleet.backbone.chat import CHAT_ROLES, encode_messages, end_of_turn_id, last_user_content
from lorafleet.domain import FeedbackRecord
from lorafleet.errors import ValidationError
from lorafleet.training.config import TrainingConfig

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
IGNORE_INDEX = -100
_HOLDOUT_SALT = b"lorafleet-holdout/"


Turn = tuple[str, str]


@dataclass(frozen=True)
class Example:
    """One training target: ``completion`` is learned given ``context`` (the turns before it, as ``(role,
    content)``; empty: ``prompt`` is the one user turn). ``prompt`` is always the last user turn's content;
    ``rejected`` only for preferences."""

    record_id: int
    prompt: str
    completion: str
    kind: str
    rejected: str | None = None
    context: tuple[Turn, ...] = ()

    @property
    def messages(self) -> tuple[Turn, ...]:
        """The conversation the target answers: the context, or the prompt as one user turn."""
        return self.context or (("user", self.prompt),)


@dataclass(frozen=True)
class UserDataset:
    """A user's examples split into train and holdout, and how many records were left out, by reason."""

    train: tuple[Example, ...]
    holdout: tuple[Example, ...]
    excluded: dict[str, int]


@dataclass(frozen=True)
class EncodedBatch:
    """Left-padded token ids; ``labels`` is -100 outside completion tokens (and on padding)."""

    input_ids: torch.Tensor  # [batch, seq] int64
    attention_mask: torch.Tensor  # [batch, seq] int64
    labels: torch.Tensor  # [batch, seq] int64

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def is_holdout(content_hash: str, fraction: float) -> bool:
    """Whether a record belongs to the holdout: a salted sha256 of its content hash, read as a uniform number."""
    if not 0.0 <= fraction <= 1.0:
        raise ValidationError(f"holdout fraction must be in [0, 1], got {fraction!r}")
    digest = hashlib.sha256(_HOLDOUT_SALT + content_hash.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _conversation(messages: object) -> tuple[Turn, ...] | None:
    """A stored conversation as ``(role, content)`` turns; None unless it has a user turn and ends with the
    assistant's (ingestion checked that; a row that is not so anymore counts as malformed)."""
    if not isinstance(messages, list) or not messages:
        return None
    turns = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str) or not content:
            return None
        turns.append((str(role), content))
    if turns[-1][0] != "assistant" or not any(role == "user" for role, _ in turns):
        return None
    return tuple(turns)


def _example_from_messages(record: FeedbackRecord, messages: object) -> Example | str:
    turns = _conversation(messages)
    if turns is None:
        return "malformed"
    context = turns[:-1]
    return Example(record.id, last_user_content(context), turns[-1][1], record.kind, context=context)


def example_from_record(record: FeedbackRecord, *, rating_threshold: float) -> Example | str:
    """The record's training example, or the reason it is excluded (a key of ``UserDataset.excluded``)."""
    payload: dict[str, Any] = record.payload
    if record.kind == "sft" and "messages" in payload:
        return _example_from_messages(record, payload["messages"])
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "malformed"
    if record.kind == "sft":
        target, rejected = payload.get("completion"), None
    elif record.kind == "preference":
        target, rejected = payload.get("chosen"), payload.get("rejected")
        if not isinstance(rejected, str):
            return "malformed"
    elif record.kind == "rating":
        score, target, rejected = payload.get("score"), payload.get("response"), None
        if isinstance(score, bool) or not isinstance(score, int | float):
            return "malformed"
        if score < rating_threshold:
            return "rating_below_threshold"
    else:
        return "unknown_kind"
    if not isinstance(target, str) or not target:
        return "malformed"
    return Example(record.id, prompt, target, record.kind, rejected)


def build_dataset(records: Sequence[FeedbackRecord], *, config: TrainingConfig) -> UserDataset:
    """Turn one user's records into train/holdout examples by the module's rules (input order is kept)."""
    train: list[Example] = []
    holdout: list[Example] = []
    excluded: Counter[str] = Counter()
    seen: set[str] = set()
    low_rated: dict[str, tuple[float, str]] = {}  # prompt -> (score, response) of its lowest rating
    for record in records:
        if record.content_hash in seen:
            excluded["duplicate"] += 1
            continue
        seen.add(record.content_hash)
        example = example_from_record(record, rating_threshold=config.rating_threshold)
        if isinstance(example, str):
            excluded[example] += 1
            if example == "rating_below_threshold" and config.trains_preferences:
                _keep_lowest(low_rated, record.payload)
        elif is_holdout(record.content_hash, config.holdout_fraction):
            holdout.append(example)
        else:
            train.append(example)
    if low_rated:
        used: set[str] = set()
        train, holdout = _rating_pairs(train, low_rated, used), _rating_pairs(holdout, low_rated, used)
        # the lowest rating of each paired prompt is trained on, as the rejected answer
        excluded["rating_below_threshold"] -= len(used)
        excluded["rating_paired"] += len(used)
    counts = {k: v for k, v in sorted(excluded.items()) if v > 0}
    return UserDataset(tuple(train), tuple(holdout), counts)


def _keep_lowest(low_rated: dict[str, tuple[float, str]], payload: dict[str, Any]) -> None:
    prompt, score, response = payload.get("prompt"), payload.get("score"), payload.get("response")
    if isinstance(prompt, str) and isinstance(response, str) and response and isinstance(score, int | float):
        if prompt not in low_rated or float(score) < low_rated[prompt][0]:
            low_rated[prompt] = (float(score), response)


def _rating_pairs(
    examples: list[Example], low_rated: dict[str, tuple[float, str]], used: set[str]
) -> list[Example]:
    """High-rated examples with their prompt's lowest-rated response as the rejected answer (``used``: the
    prompts whose low rating found a pair)."""
    out = []
    for example in examples:
        low = low_rated.get(example.prompt) if example.kind == "rating" else None
        if low is None or low[1] == example.completion:
            out.append(example)
        else:
            out.append(replace(example, rejected=low[1]))
            used.add(example.prompt)
    return out


def reservoir_sample(items: Sequence[T], k: int, *, seed: int) -> list[T]:
    """A uniform sample of ``k`` items without replacement (Algorithm R), in input order; all items if fewer."""
    if k < 0:
        raise ValidationError(f"sample size must be >= 0, got {k}")
    rng = random.Random(seed)
    reservoir: list[int] = list(range(min(k, len(items))))
    for i in range(k, len(items)):
        j = rng.randint(0, i)
        if j < k:
            reservoir[j] = i
    return [items[i] for i in sorted(reservoir)]


def encode_prompt(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the example's rendered conversation, up to the assistant's turn: what serving feeds the
    model for the same request (use it to generate for an example, e.g. QA samples)."""
    return encode_messages(tokenizer, example.messages, add_generation_prompt=True)


def encode_example(
    tokenizer: Any, example: Example, *, max_seq_len: int, add_eos: bool = True
) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ end of turn) and how many trailing ids are the completion.

    The prompt is the rendered conversation (``encode_prompt``: the chat template, or the plain format where a
    single user turn is its text unchanged), so training sees what serving sees; the completion is tokenized
    without special tokens, and ``add_eos`` appends the end-of-turn id serving stops at (``<|im_end|>`` for
    ChatML, else the eos). Too long: the prompt loses its oldest tokens first, and the completion keeps at
    least half of ``max_seq_len``.
    """
    prompt_ids = encode_prompt(tokenizer, example)
    completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    end_id = end_of_turn_id(tokenizer) if add_eos else None
    if end_id is not None:
        completion_ids.append(end_id)
    if len(prompt_ids) + len(completion_ids) > max_seq_len:
        keep_completion = min(len(completion_ids), max(max_seq_len // 2, max_seq_len - len(prompt_ids)))
        completion_ids = completion_ids[:keep_completion]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_seq_len - keep_completion) :]
    return prompt_ids + completion_ids, len(completion_ids)


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], *, max_seq_len: int, add_eos: bool = True
) -> EncodedBatch:
    """Left-padded batch of prompt + completion; labels are the completion tokens only (-100 elsewhere)."""
    if not examples:
        raise ValidationError("cannot encode an empty list of examples")
    encoded = [encode_example(tokenizer, e, max_seq_len=max_seq_len, add_eos=add_eos) for e in examples]
    return collate(encoded, pad_id=pad_token_id(tokenizer))


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(encoded: Sequence[tuple[list[int], int]], *, pad_id: int) -> EncodedBatch:
    """Left-pad ``(ids, n_completion)`` pairs into one batch; only the last ``n_completion`` ids get labels."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.int64)  # [batch, seq]
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.int64)  # [batch, seq]
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.int64)  # [batch, seq]
    for row, (ids, n_completion) in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, width - len(ids) :] = 1
        if n_completion:
            labels[row, width - n_completion :] = input_ids[row, width - n_completion :]
    return EncodedBatch(input_ids, attention_mask, labels)
