"""Scoring completions through an adapter bank: per-example loss and accuracy, and ``evaluate`` over a set.

Every metric is teacher-forced on the completion tokens only (the prompt is context, as in training). The
output head runs only on the positions that predict a completion token (:func:`scored_logits`), so scoring
long prompts against a large vocabulary never materialises ``[batch, seq, vocab]``. Given a
:class:`~lorafleet.adapters.prefix.FrozenPrefix`, the layers below the lowest adapted one are not run again for
rows whose states it holds (training steps, holdouts, QA's columns over the same rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.adapters.prefix import (
    MIN_SHARED_START,
    DecoderSplit,
    FrozenPrefix,
    common_start,
    lowest_adapted_layer,
    pad_states,
    route_groups,
)
from lorafleet.errors import ValidationError
from lorafleet.training.dataset import (
    IGNORE_INDEX,
    EncodedBatch,
    Example,
    collate,
    encode_example,
    pad_token_id,
)

#: ``(slot, weight)`` pairs one sequence is routed through (empty = the base model alone)
Route = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and token accuracy over all completion tokens of a set, and the share of fully right examples."""

    loss: float
    token_accuracy: float
    tokens: int
    examples: int = 0
    #: share of examples whose every completion token is the argmax (teacher-forced exact match)
    sequence_accuracy: float = math.nan
    #: mean loss over the answers' body: every completion token but each answer's first and its last (the end of
    #: turn), where a style that opens or closes answers its own way (a greeting, a sign-off) must differ
    body_loss: float = math.nan


@dataclass(frozen=True)
class ExampleScore:
    """One example's summed completion loss (negative log-likelihood), token count and argmax hits."""

    loss_sum: float
    tokens: int
    correct: int
    #: scored positions whose logits held a NaN or an infinity
    nonfinite: int = 0
    #: the summed loss of the completion's first token and its last (the end of turn), and how many those are
    ends_loss_sum: float = 0.0
    ends: int = 0

    @property
    def exact(self) -> bool:
        return self.tokens > 0 and self.correct == self.tokens


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` computes them for left padding."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [batch, seq]


@dataclass(frozen=True)
class ScoredPositions:
    """The positions of a batch whose output predicts a completion token, flattened over rows."""

    rows: torch.Tensor  # [n] int64: the row of each scored position
    positions: torch.Tensor  # [n] int64: the position whose output is scored (its label is at position + 1)
    labels: torch.Tensor  # [n] int64: the token it must predict


def scored_positions(labels: torch.Tensor) -> ScoredPositions:
    """Every (row, position) whose next token carries a label (``labels`` is ``[batch, seq]``, -100 = none)."""
    following = labels[:, 1:]  # [batch, seq - 1]: the label each position predicts
    rows, positions = (following != IGNORE_INDEX).nonzero(as_tuple=True)  # [n], [n]
    return ScoredPositions(rows, positions, following[rows, positions])


def decoder_split(model: Any) -> DecoderSplit | None:
    """The model's checked :class:`DecoderSplit`, found once and kept on the model (None: not splittable)."""
    if not hasattr(model, "_lorafleet_split"):
        object.__setattr__(model, "_lorafleet_split", DecoderSplit.find(model))
    return model._lorafleet_split  # type: ignore[no-any-return]


def scored_logits(
    model: Any,
    batch: EncodedBatch,
    *,
    prefix: FrozenPrefix | None = None,
    layer: int = 0,
    sequences: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, ScoredPositions]:
    """fp32 logits ``[n, vocab]`` at the scored positions only, and those positions.

    With ``prefix`` and ``layer`` > 0, the states entering ``layer`` come from the prefix (computed once per
    sequence; ``sequences`` are the batch's unpadded token ids) and only layers ``layer..`` run here; call it
    inside the bank's routing context, with no adapter below ``layer``.
    """
    scored = scored_positions(batch.labels)
    positions = position_ids(batch.attention_mask)  # [batch, seq]
    if prefix is not None and layer > 0 and sequences is not None:
        per_row = prefix.states(layer, sequences)
        start = shared_start(prefix, sequences, scored, batch.input_ids.shape[1])
        if start is not None:
            return _scored_with_shared_start(prefix, layer, per_row, start, scored, batch.input_ids.shape[1])
        states = pad_states(per_row, batch.input_ids.shape[1])  # [batch, seq, hidden]
        kwargs = prefix.split.layer_kwargs(states, batch.attention_mask, positions)
        hidden = prefix.split.run_from(layer, states, kwargs)  # [batch, seq, hidden]
        return prefix.split.head(hidden[scored.rows, scored.positions]), scored
    split = prefix.split if prefix is not None else decoder_split(model)
    if split is not None:
        hidden = split.final_hidden(batch.input_ids, batch.attention_mask, positions)  # [batch, seq, hidden]
        return split.head(hidden[scored.rows, scored.positions]), scored
    logits, labels = completion_logits(model, batch)  # a model the split does not fit: keep the tail
    offset = batch.labels.shape[1] - 1 - labels.shape[1]
    return logits[scored.rows, scored.positions - offset], scored


@dataclass(frozen=True)
class SharedStart:
    """Rows of a batch that all begin with the same ``length`` tokens (e.g. a chat template's system prompt),
    grouped by route: the start runs once per group (``representatives``: a row of each), ``owners`` ``[batch]``
    each row's group, ``plan`` the routing of the groups (None: the caller's plan is base only or no bank)."""

    length: int
    representatives: list[int]
    owners: torch.Tensor
    plan: SlotPlan | None


def shared_start(
    prefix: FrozenPrefix, sequences: Sequence[Sequence[int]], scored: ScoredPositions, width: int
) -> SharedStart | None:
    """How a batch's rows share their first tokens, when worth it: at least ``MIN_SHARED_START`` of them before
    any scored position, fewer groups than rows, and rows routed by whole rows (not per token, not in parts)."""
    if not prefix.split.shares_starts or len(sequences) < 2 or scored.rows.numel() == 0:
        return None
    length = common_start(sequences)
    lengths = torch.tensor([len(s) for s in sequences], device=scored.rows.device)  # [batch]
    # no scored output may fall in the start: the earliest one, counted from each row's first real token
    length = min(length, int((scored.positions - (width - lengths[scored.rows])).min()))
    if length < MIN_SHARED_START:
        return None
    plan = prefix.bank.current_plan() if prefix.bank is not None else None
    if plan is None:
        keys: list[tuple[object, ...]] = [()] * len(sequences)
    elif isinstance(plan, SlotPlan) and plan.weights.dim() == 2 and plan.batch_size == len(sequences):
        keys = [(*plan.slot_ids[r].tolist(), *plan.weights[r].tolist()) for r in range(len(sequences))]
    else:
        return None
    owners, representatives = route_groups(keys)
    if len(representatives) >= len(sequences):
        return None
    sub = None if plan is None else SlotPlan(plan.slot_ids[representatives], plan.weights[representatives])
    return SharedStart(length, representatives, torch.tensor(owners, device=scored.rows.device), sub)


def _scored_with_shared_start(
    prefix: FrozenPrefix,
    layer: int,
    per_row: Sequence[torch.Tensor],
    start: SharedStart,
    scored: ScoredPositions,
    width: int,
) -> tuple[torch.Tensor, ScoredPositions]:
    """:func:`scored_logits`' prefix path with the rows' shared start run once per group."""
    n = start.length
    first = torch.stack([per_row[r][:n] for r in start.representatives])  # [groups, n, hidden]
    rest = pad_states([s[n:] for s in per_row], width - n)  # [batch, width - n, hidden]
    rest_mask = torch.zeros(rest.shape[:2], dtype=torch.long, device=rest.device)  # [batch, width - n]
    for row, states in enumerate(per_row):
        rest_mask[row, rest_mask.shape[1] - (states.shape[0] - n) :] = 1
    bank = prefix.bank

    def route_start() -> AbstractContextManager[Any]:
        return nullcontext() if bank is None else bank.use(start.plan)

    hidden = prefix.split.run_from_shared(layer, first, rest, rest_mask, start.owners, route_start)
    # a row's tokens after the start sit ``n`` columns to the left of where they are in the whole batch
    return prefix.split.head(hidden[scored.rows, scored.positions - n]), scored


def completion_logits(model: Any, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits at the positions that predict labelled tokens, and those labels (-100 = not scored).

    Left padding puts every completion at the right edge, so only the last ``n`` positions are computed by the
    language-model head (``logits_to_keep``).
    """
    width = batch.labels.shape[1]
    labelled = (batch.labels != IGNORE_INDEX).any(dim=0)  # [seq]
    first = int(labelled.nonzero()[0]) if bool(labelled.any()) else width - 1
    first = max(first, 1)  # position 0 has no previous token to predict it
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        logits_to_keep=width - first + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()  # [batch, width - first, vocab]
    return logits, batch.labels[:, first:]  # labels: [batch, width - first]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, 0 where the label is -100."""
    vocab = logits.shape[-1]
    flat = F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return flat.view(labels.shape)  # [batch, n]


@torch.no_grad()
def score_examples(
    bank: AdapterBank,
    tokenizer: Any,
    examples: Sequence[Example],
    routes: Sequence[Route],
    *,
    max_seq_len: int,
    batch_size: int = 32,
    add_eos: bool = True,
    prefix: FrozenPrefix | None = None,
) -> list[ExampleScore]:
    """Score each example through its own route (one route per example), in batches of similar length.

    Rows of one batch may use different slots or mixtures: a single forward serves them all, as in serving.
    The model is put in eval mode for the call and restored afterwards. With ``prefix``, layers below the
    lowest one any route adapts run once per distinct sequence (the same row under several routes, e.g. QA's
    columns, shares them).
    """
    if len(routes) != len(examples):
        raise ValidationError(f"{len(examples)} examples but {len(routes)} routes")
    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_example(tokenizer, e, max_seq_len=max_seq_len, add_eos=add_eos) for e in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding per batch
    scores: list[ExampleScore | None] = [None] * len(encoded)
    model, pad_id = bank.model, pad_token_id(tokenizer)
    layer = 0
    if prefix is not None:  # one layer for the whole call, so every route of a row reuses the same states
        used = {slot for route in routes for slot, _ in route}
        layer = lowest_adapted_layer(bank, used, prefix.num_layers)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([encoded[i] for i in chunk], pad_id=pad_id).to(bank.device)
            plan = SlotPlan.from_rows([list(routes[i]) for i in chunk])
            with bank.use(plan):
                logits, scored = scored_logits(
                    model, batch, prefix=prefix, layer=layer, sequences=[encoded[i][0] for i in chunk]
                )
            rows = len(chunk)
            loss = F.cross_entropy(logits, scored.labels, reduction="none")  # [n]
            hit = (logits.argmax(dim=-1) == scored.labels).to(loss.dtype)  # [n]
            loss_sum = loss.new_zeros(rows).index_add(0, scored.rows, loss)  # [rows]
            correct = loss.new_zeros(rows).index_add(0, scored.rows, hit)  # [rows]
            tokens = loss.new_zeros(rows).index_add(0, scored.rows, torch.ones_like(loss))  # [rows]
            broken = (~torch.isfinite(logits).all(dim=-1)).to(loss.dtype)  # [n]
            nonfinite = loss.new_zeros(rows).index_add(0, scored.rows, broken)  # [rows]
            first, last = row_ends(scored.rows)
            at_end = (first | last).to(loss.dtype)  # [n]
            ends_loss = loss.new_zeros(rows).index_add(0, scored.rows, loss * at_end)  # [rows]
            ends = loss.new_zeros(rows).index_add(0, scored.rows, at_end)  # [rows]
            for row, i in enumerate(chunk):
                scores[i] = ExampleScore(
                    float(loss_sum[row]),
                    int(tokens[row]),
                    int(correct[row]),
                    int(nonfinite[row]),
                    float(ends_loss[row]),
                    int(ends[row]),
                )
    finally:
        model.train(was_training)
    return [s for s in scores if s is not None]


def summarize(scores: Sequence[ExampleScore]) -> EvalResult:
    """Token-weighted loss and accuracy over examples (NaN when there is nothing to score)."""
    tokens = sum(s.tokens for s in scores)
    if tokens == 0:
        return EvalResult(math.nan, math.nan, 0, len(scores), math.nan)
    body = tokens - sum(s.ends for s in scores)
    return EvalResult(
        loss=sum(s.loss_sum for s in scores) / tokens,
        token_accuracy=sum(s.correct for s in scores) / tokens,
        tokens=tokens,
        examples=len(scores),
        sequence_accuracy=sum(s.exact for s in scores) / len(scores),
        body_loss=sum(s.loss_sum - s.ends_loss_sum for s in scores) / body if body else math.nan,
    )


def row_ends(token_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of scored tokens that come row by row (``token_rows``: ``[n]``, each one's row), which are the first of
    their row and which the last (``[n]`` bool each)."""
    first = torch.zeros_like(token_rows, dtype=torch.bool)  # [n]
    last = torch.zeros_like(first)  # [n]
    if token_rows.numel() == 0:
        return first, last
    changes = token_rows[1:] != token_rows[:-1]  # [n - 1]: a new row starts at the next token
    first[0] = last[-1] = True
    first[1:] = changes
    last[:-1] = changes
    return first, last


def evaluate(
    bank: AdapterBank,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    slot: int | None,
    max_seq_len: int,
    batch_size: int = 32,
    mixture: list[tuple[int, float]] | None = None,
) -> EvalResult:
    """Teacher-forced loss and accuracy on the completions through one slot, a mixture, or the base (None)."""
    if mixture is not None and slot is not None:
        raise ValidationError("give either slot or mixture, not both")
    route: list[tuple[int, float]] = (
        list(mixture) if mixture is not None else [] if slot is None else [(slot, 1.0)]
    )
    scores = score_examples(
        bank, tokenizer, examples, [route] * len(examples), max_seq_len=max_seq_len, batch_size=batch_size
    )
    return summarize(scores)
