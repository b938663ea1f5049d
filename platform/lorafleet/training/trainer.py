"""The multi-tenant trainer: K users' adapter slots trained together in one batched loop on a frozen backbone.

Each micro-step packs ``batch_size`` sequences of every user into one batch and routes each row to its user's
slot (``SlotPlan.single``). A user's loss is the mean over its own completion tokens, and the job's loss is
the sum over users, so each user gets a full-strength gradient whatever the others' data sizes, and a user with
more data (or longer completions) does not drown the others. AdamW has one parameter group per slot (two with
LoRA+, ``lr_ratio_b``: its A matrices and its B matrices, which learn at that multiple of the rate); gradients
are clipped per slot; the learning rate warms up linearly, then decays on a cosine to zero.

With ``dpo_weight`` > 0 a user's preference pairs train with DPO (``lorafleet.training.preference``) in the same
batches: each micro-step packs ``batch_size`` SFT sequences and ``pairs_per_step`` pairs (two rows: chosen,
rejected) of every user, and a user's objective is ``sft_weight`` times its SFT loss plus ``dpo_weight`` times
the mean DPO loss of its pairs. The reference log-probs of every pair are computed once, before the first step.
With ``sft_on_chosen`` each pair's chosen row also counts in its user's SFT loss (DPO plus an NLL term on the
chosen answers), at no extra rows.

A user's anchor rows (general prompts answered by the base) train towards the base's answers, and the anchor
terms of ``lorafleet.training.anchors`` add to its objective when their weights are set (``anchor_distill``,
``anchor_unlikelihood``).

A non-finite loss or gradient raises :class:`TrainingError` at once; the slots then hold partly trained
weights, and the caller must not save them. ``should_stop`` is called before every step (the job runner raises
``LeaseLostError`` through it). Given ``config.seed`` a run is deterministic: a user's batches depend only on
the seed and its key, and dropout draws come from a forked, seeded RNG (global RNG state is left untouched).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.adapters.bank import peft_key
from lorafleet.adapters.dense import dense_budget, dense_views
from lorafleet.adapters.prefix import FrozenPrefix, lowest_adapted_layer
from lorafleet.errors import TrainingError, ValidationError
from lorafleet.training.anchors import (
    ANCHOR_DISTILL_TOP_K,
    AnchorTargets,
    anchor_distill,
    anchor_unlikelihood,
    base_targets,
    free_answer_ends,
)
from lorafleet.training.config import TrainingConfig
from lorafleet.training.contrast import CONTRAST_KIND
from lorafleet.training.dataset import (
    EncodedBatch,
    Example,
    collate,
    encode_example,
    pad_token_id,
)
from lorafleet.training.metrics import (
    EvalResult,
    evaluate,
    row_ends,
    score_examples,
    scored_logits,
    summarize,
)
from lorafleet.training.preference import (
    JobPairs,
    batch_dpo,
    holdout_margins,
    is_pair,
    pair_sides,
    preference_accuracy,
    reference_pairs,
)

__all__ = [
    "EvalResult",
    "SlotResult",
    "SlotTraining",
    "anchor_targets",
    "evaluate",
    "preference_pairs",
    "sft_examples",
    "train_slots",
    "user_losses",
]

logger = logging.getLogger(__name__)
#: rows per forward when scoring the holdouts of all users of a job together
EVAL_BATCH_ROWS = 64
#: optimizer steps averaged into ``train_loss`` (the end of training, not the whole run)
TRAIN_LOSS_WINDOW = 10


@dataclass
class SlotTraining:
    """One user of a job: the bank slot to train (already loaded by the caller) and its examples.

    ``parent_state`` holds the parent adapter's tensors in PEFT key names, for the optional L2 pull.
    ``anchors`` are general prompts answered by the base model itself, trained on beside the user's examples
    (self-distillation), so the adapter keeps the base's answers where the user taught nothing.
    """

    slot: int
    key: str
    train: Sequence[Example]
    holdout: Sequence[Example]
    parent_state: dict[str, torch.Tensor] | None = None
    anchors: Sequence[Example] = ()
    #: the slot holding the DPO reference; None: this slot as it is before the first step (the parent version it
    #: was loaded from, or the base model for a fresh slot)
    reference_slot: int | None = None
    #: whether the slot continues a parent version (its passes are ``config.continual_min_epochs``)
    continues: bool = False


@dataclass
class SlotResult:
    """What training did for one user; ``metrics`` keys are listed in :func:`train_slots`."""

    slot: int
    key: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _UserStream:
    """A user's pre-encoded training items (sequences, or pairs of them), served in reshuffled epochs (the order is
    seeded by user key)."""

    encoded: list[Any]
    rng: random.Random
    order: list[int] = field(default_factory=list)
    #: index of the first anchor in ``encoded``: the user's own rows come first (None or len(encoded): no anchors)
    anchors_from: int | None = None
    #: indices in ``encoded`` whose completion trains no likelihood (contrast rows, :mod:`.contrast`)
    unlikely_only: frozenset[int] = frozenset()
    #: index in ``encoded`` -> position among the distilled anchors (every anchor but the contrast rows)
    _distilled: dict[int, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.anchors_from is not None:
            kept = [i for i in range(self.anchors_from, len(self.encoded)) if i not in self.unlikely_only]
            self._distilled = {i: position for position, i in enumerate(kept)}

    def take(self, n: int) -> list[Any]:
        """The next ``min(n, size)`` distinct sequences (an epoch boundary reshuffles)."""
        return [self.encoded[i] for i in self.take_indices(n)]

    def is_anchor(self, index: int) -> bool:
        """Whether ``encoded[index]`` is an anchor (a general prompt answered by the base)."""
        return self.anchors_from is not None and index >= self.anchors_from

    def anchor_index(self, index: int) -> int | None:
        """The position of ``encoded[index]`` among the task's distilled anchors, those of :meth:`distilled` (None:
        a user's own row, or a contrast row)."""
        return self._distilled.get(index)

    def distilled(self) -> list[Any]:
        """The encoded anchors that ``anchor_distill`` pulls to the base, in order: every anchor but the contrast
        rows, whose completion is the user's answer to a question about someone else (the base's distribution
        there would teach the adapter to doubt the user's own answers: measured, it cost a tenth of the facts)."""
        return [self.encoded[i] for i in self._distilled]

    def take_indices(self, n: int) -> list[int]:
        """The indices in ``encoded`` of the next ``min(n, size)`` distinct sequences."""
        n = min(n, len(self.encoded))
        picked: list[int] = []
        while len(picked) < n:
            if not self.order:
                self.order = list(range(len(self.encoded)))
                self.rng.shuffle(self.order)
            candidate = self.order.pop()
            if candidate not in picked:
                picked.append(candidate)
            else:  # the epoch ended mid-batch: keep the repeat for the next batch
                self.order.insert(0, candidate)
        return picked


@dataclass
class _SlotStats:
    step_losses: list[float] = field(default_factory=list)
    dpo_losses: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    tokens: int = 0


def sft_examples(task: SlotTraining, config: TrainingConfig) -> list[Example]:
    """The task's rows trained as SFT: all of them, less the preference pairs when DPO trains those."""
    if config.sft_weight == 0:
        return []
    rows = [*task.train, *task.anchors]
    return [e for e in rows if not is_pair(e)] if config.trains_preferences else rows


def preference_pairs(examples: Sequence[Example], config: TrainingConfig) -> list[Example]:
    """The preference pairs among ``examples`` that DPO trains on (none when ``dpo_weight`` is 0)."""
    return [e for e in examples if is_pair(e)] if config.trains_preferences else []


def lr_factor(step: int, *, total: int, warmup_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine to zero."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_slots(
    bank: AdapterBank,
    tokenizer: Any,
    tasks: Sequence[SlotTraining],
    config: TrainingConfig,
    *,
    should_stop: Callable[[], None] | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    progress_every: int | None = None,
    prefix: FrozenPrefix | None = None,
    dense_budget_bytes: int | None = None,
) -> list[SlotResult]:
    """Train every task's slot for ``config.max_steps`` optimizer steps together (more when ``config.min_epochs``
    or, for a task that ``continues`` a parent, ``config.continual_min_epochs`` asks for them: the most any task
    needs, ``TrainingConfig.steps_for``); results in task order.

    Metrics per user: ``train_loss`` (mean of the last steps' objective: SFT, DPO, the anchor unlikelihood and
    the anchor distillation, each with its weight), ``train_loss_first``, ``steps``,
    ``train_examples``, ``holdout_examples``, ``tokens`` (completion tokens trained on), and when the holdout is
    not empty ``holdout_loss_before/after``, ``holdout_token_accuracy_before/after`` and
    ``holdout_sequence_accuracy_before/after`` (absent with an empty holdout: no NaN in stored metrics). With DPO
    (``dpo_weight`` > 0) and preference pairs: ``preference_pairs``, ``dpo_loss_first``, ``dpo_loss`` and
    ``reward_margin`` (means of the last steps), and with held-out pairs ``holdout_preference_pairs``,
    ``holdout_preference_accuracy_after`` and ``holdout_reward_margin_after`` (against the reference).
    ``progress(step, total, {"loss", "lr", "losses"})`` is called every ``progress_every`` steps (default: a
    tenth); ``losses`` maps each task's key to its loss at that step.

    With ``prefix``, the layers below the lowest layer any of the job's slots adapts run once per example (its
    cache), and every step runs only the layers above; the losses and gradients are those of the full model.
    On CPU the 4-bit layers that run every step compute from dense copies made once for the job
    (:func:`lorafleet.adapters.dense.dense_views`, within ``dense_budget_bytes``, default 1 GiB): same numbers,
    without dequantising the weights on every call.
    """
    _check_tasks(bank, tasks, config)
    steps = min(
        100_000,
        max(
            (config.steps_for(len(t.train) + len(t.anchors), continuing=t.continues) for t in tasks),
            default=config.max_steps,
        ),
    )
    if steps != config.max_steps:  # min_epochs asks for more passes over this job's data
        logger.info(
            "training %d steps (max_steps %d): min_epochs %g, continual_min_epochs %s",
            steps,
            config.max_steps,
            config.min_epochs,
            config.continual_min_epochs,
        )
        config = config.with_changes(max_steps=steps)
    # Adam's second moments of small LoRA gradients decay into subnormal floats, which x86 CPUs compute
    # about a hundred times slower (measured: a third of a step in AdamW's sqrt); flush them to zero.
    torch.set_flush_denormal(True)
    for note in config.outside_typical_ranges():
        logger.warning("training config: %s", note)
    started = time.monotonic()
    devices = [bank.device] if bank.device.type == "cuda" else []
    first_run = lowest_adapted_layer(bank, [t.slot for t in tasks], prefix.num_layers) if prefix else 0
    budget = dense_budget(bank.device, dense_budget_bytes)
    with (
        torch.random.fork_rng(devices=devices),
        dense_views(bank.model, from_layer=first_run, budget_bytes=budget),
    ):
        torch.manual_seed(config.seed)
        before = _evaluate_holdouts(bank, tokenizer, tasks, config, prefix)
        preferences = reference_pairs(
            bank,
            tokenizer,
            [(preference_pairs(t.train, config), preference_pairs(t.holdout, config)) for t in tasks],
            [[(t.slot if t.reference_slot is None else t.reference_slot, 1.0)] for t in tasks],
            max_seq_len=config.max_seq_len,
            prefix=prefix,
        )
        frozen = _Frozen(prefix, first_run)
        stats = _train(
            bank, tokenizer, tasks, preferences, config, should_stop, progress, progress_every, frozen
        )
        after = _evaluate_holdouts(bank, tokenizer, tasks, config, prefix)
        pairs_after = holdout_margins(
            bank,
            tokenizer,
            preferences,
            [[(t.slot, 1.0)] for t in tasks],
            beta=config.dpo_beta,
            max_seq_len=config.max_seq_len,
            prefix=prefix,
        )
    logger.info(
        "trained %d slots for %d steps in %.1f s", len(tasks), config.max_steps, time.monotonic() - started
    )
    return [
        SlotResult(task.slot, task.key, _metrics(task, stats[i], before[i], after[i], pairs_after[i], config))
        for i, task in enumerate(tasks)
    ]


def _check_tasks(bank: AdapterBank, tasks: Sequence[SlotTraining], config: TrainingConfig) -> None:
    """Refuse a job that cannot run, before any weight is touched."""
    if not tasks:
        raise ValidationError("train_slots needs at least one task")
    slots = [t.slot for t in tasks]
    if len(set(slots)) != len(slots):
        raise ValidationError(f"each task needs its own slot, got slots {slots}")
    for task in tasks:
        if bank.slot_info(task.slot) is None:
            raise ValidationError(f"slot {task.slot} ({task.key}) is empty: load or init it before training")
        if not task.train:
            raise ValidationError(f"user {task.key} has no training examples")
        if not sft_examples(task, config) and not preference_pairs(task.train, config):
            raise ValidationError(
                f"user {task.key} has nothing to train with sft_weight 0: no preference pairs for DPO"
            )
        if task.parent_state is not None:
            _check_parent(bank, task)
        if task.reference_slot is not None and bank.slot_info(task.reference_slot) is None:
            raise ValidationError(f"reference slot {task.reference_slot} of {task.key} is empty")


def _check_parent(bank: AdapterBank, task: SlotTraining) -> None:
    info = bank.slot_info(task.slot)
    assert info is not None
    expected = {peft_key(m, ab) for m in info.modules for ab in "AB"}
    parent = task.parent_state or {}
    if set(parent) != expected:
        missing, extra = sorted(expected - set(parent))[:3], sorted(set(parent) - expected)[:3]
        raise ValidationError(
            f"parent_state of {task.key} does not match slot {task.slot}: missing {missing}, extra {extra}"
        )
    for module in info.modules:
        a, b = parent[peft_key(module, "A")], parent[peft_key(module, "B")]
        layer = bank.layers[module]
        if tuple(a.shape) != (info.config.rank, layer.in_features) or tuple(b.shape) != (
            layer.out_features,
            info.config.rank,
        ):
            raise ValidationError(
                f"parent_state of {task.key}: {module} has shapes {tuple(a.shape)}/{tuple(b.shape)}"
            )


def _train(
    bank: AdapterBank,
    tokenizer: Any,
    tasks: Sequence[SlotTraining],
    preferences: Sequence[JobPairs],
    config: TrainingConfig,
    should_stop: Callable[[], None] | None,
    progress: Callable[[int, int, dict[str, Any]], None] | None,
    progress_every: int | None,
    frozen: _Frozen,
) -> list[_SlotStats]:
    """The optimisation loop; leaves the model in its previous mode and releases the slots' training views."""
    model, slots = bank.model, [t.slot for t in tasks]
    streams = [_stream(tokenizer, task, config) for task in tasks]
    pair_streams = [
        _pair_stream(tokenizer, task, p, config) for task, p in zip(tasks, preferences, strict=True)
    ]
    personal = personal_tokens(tokenizer, tasks, config, bank.device)
    free_ends = [
        free_answer_ends(None if stream is None else stream.encoded, config.anchor_free_ends)
        for stream in pair_streams
    ]
    distill = anchor_targets(bank, streams, tasks, config, pad_token_id(tokenizer), frozen)
    stats = [_SlotStats() for _ in tasks]
    every = progress_every or max(1, config.max_steps // 10)
    was_training = model.training
    try:
        groups = _lora_plus_groups(bank.parameter_groups(slots), config.lr_ratio_b)
        # foreach: on CPU torch defaults to a Python loop over tensors, and a job has many small ones per slot
        optimizer = torch.optim.AdamW(
            groups, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
        )
        parents = [_parent_pairs(bank, task) for task in tasks]
        model.train()
        for step in range(config.max_steps):
            if should_stop is not None:
                should_stop()
            lr = config.learning_rate * lr_factor(
                step, total=config.max_steps, warmup_ratio=config.warmup_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            step_losses = _accumulate(
                bank,
                _Streams(streams, pair_streams, preferences, personal, distill, free_ends),
                tasks,
                parents,
                config,
                step,
                stats,
                pad_token_id(tokenizer),
                frozen,
            )
            _clip(optimizer.param_groups, tasks, config, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for i, loss in enumerate(step_losses):
                stats[i].step_losses.append(loss)
            _report(step + 1, config.max_steps, lr, step_losses, tasks, progress, every)
    finally:
        bank.release_parameters(slots)
        model.train(was_training)
    return stats


def _report(
    done: int,
    total: int,
    lr: float,
    losses: Sequence[float],
    tasks: Sequence[SlotTraining],
    progress: Callable[[int, int, dict[str, Any]], None] | None,
    every: int,
) -> None:
    """The progress callback every ``every`` steps and at the last; a log line at every tenth of the steps."""
    last = done == total
    mean_loss = sum(losses) / len(losses)
    if done % max(1, total // 10) == 0 or last:
        logger.info("step %d/%d: mean user loss %.4f, lr %.2e", done, total, mean_loss, lr)
    if progress is not None and (done % every == 0 or last):
        per_subject = {task.key: loss for task, loss in zip(tasks, losses, strict=True)}
        progress(done, total, {"loss": mean_loss, "lr": lr, "losses": per_subject})


def _stream(tokenizer: Any, task: SlotTraining, config: TrainingConfig) -> _UserStream | None:
    """The user's SFT sequences (None: it has none in this job)."""
    examples = sft_examples(task, config)
    if not examples:
        return None
    encoded = [encode_example(tokenizer, e, max_seq_len=config.max_seq_len) for e in examples]
    rng = random.Random(f"lorafleet-train/{config.seed}/{task.key}")
    contrast = frozenset(i for i, e in enumerate(examples) if e.kind == CONTRAST_KIND)
    # anchors come last
    return _UserStream(encoded, rng, anchors_from=len(examples) - len(task.anchors), unlikely_only=contrast)


def personal_tokens(
    tokenizer: Any, tasks: Sequence[SlotTraining], config: TrainingConfig, device: torch.device
) -> list[torch.Tensor | None]:
    """Per task, the token ids its anchor unlikelihood pushes down (None: none, or the term is off).

    A user's personal tokens are those of its own completions that none of its prompts, none of its anchor answers
    and no special token uses: what the user taught (a pet's name, a city, a diet) and how its answers open
    ("Your"), not the words its questions ask about or every answer needs.
    Only the user's own rows decide, so its training does not depend on who else is in the job. Preference pairs
    that DPO trains are left out: they teach a style, which DPO's reference already keeps in bounds.
    """
    if config.anchor_unlikelihood == 0 or not any(t.anchors for t in tasks):
        return [None] * len(tasks)

    def completion_ids(examples: Sequence[Example]) -> set[int]:
        ids: set[int] = set()
        for example in examples:
            tokens, n = encode_example(tokenizer, example, max_seq_len=config.max_seq_len)
            ids.update(tokens[len(tokens) - n :])
        return ids

    def prompt_ids(examples: Sequence[Example]) -> set[int]:
        return {i for e in examples for i in tokenizer(e.prompt, add_special_tokens=False)["input_ids"]}

    special = set(tokenizer.all_special_ids)
    out: list[torch.Tensor | None] = []
    for task in tasks:
        taught = [e for e in task.train if not (config.trains_preferences and is_pair(e))]
        general = [a for a in task.anchors if a.kind != CONTRAST_KIND]  # a contrast row answers as the user
        asked = prompt_ids([*task.train, *task.anchors])
        own = sorted(completion_ids(taught) - completion_ids(general) - asked - special)
        out.append(torch.tensor(own, dtype=torch.int64, device=device) if own and task.anchors else None)
    return out


def _pair_stream(
    tokenizer: Any, task: SlotTraining, preferences: JobPairs, config: TrainingConfig
) -> _UserStream | None:
    """The user's pairs as ``(index, chosen sequence, rejected sequence)`` (None: no pairs in this job)."""
    if not preferences.train:
        return None
    encoded = [
        (i, *(encode_example(tokenizer, side, max_seq_len=config.max_seq_len) for side in pair_sides(pair)))
        for i, pair in enumerate(preferences.train)
    ]
    return _UserStream(encoded, random.Random(f"lorafleet-pairs/{config.seed}/{task.key}"))


def _parent_pairs(bank: AdapterBank, task: SlotTraining) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(trainable view, parent tensor padded to the bank's max rank) for the L2 pull; empty when it is off."""
    if task.parent_state is None:
        return []
    info = bank.slot_info(task.slot)
    assert info is not None
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for module in info.modules:
        param_a, param_b = bank.layers[module].slot_parameters(task.slot)  # [r_max, d_in], [d_out, r_max]
        target_a, target_b = torch.zeros_like(param_a), torch.zeros_like(param_b)
        a, b = task.parent_state[peft_key(module, "A")], task.parent_state[peft_key(module, "B")]
        target_a[: a.shape[0]] = a.to(target_a)  # rows above the slot's rank stay zero, as in the slot
        target_b[:, : b.shape[1]] = b.to(target_b)
        pairs.extend([(param_a, target_a), (param_b, target_b)])
    return pairs


@dataclass(frozen=True)
class _Streams:
    """The job's per-user sources of rows: SFT sequences, preference pairs and the pairs' reference log-probs."""

    sft: Sequence[_UserStream | None]
    pairs: Sequence[_UserStream | None]
    preferences: Sequence[JobPairs]
    #: per user, the tokens the anchor unlikelihood pushes down on its anchor rows (:func:`personal_tokens`)
    personal: Sequence[torch.Tensor | None]
    #: per user, the base's targets on each of its anchors, in anchor order (:func:`anchor_targets`; None: off)
    distill: Sequence[list[AnchorTargets] | None] = ()
    #: per user, whether its anchors' first answer token and end of turn carry no loss (:func:`free_answer_ends`)
    free_ends: Sequence[tuple[bool, bool]] = ()


@dataclass
class _Rows:
    """One micro-batch being packed: its rows, each row's user, and the pairs' (user, pair, chosen row)."""

    rows: list[tuple[list[int], int]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    sft: list[bool] = field(default_factory=list)
    anchor: list[bool] = field(default_factory=list)
    #: per row, its index among its user's distilled anchors (None: not an anchor, or a contrast row)
    anchor_index: list[int | None] = field(default_factory=list)
    pairs: list[tuple[int, int, int]] = field(default_factory=list)

    def add_sft(self, user: int, stream: _UserStream, n: int) -> None:
        picked = stream.take_indices(n)
        self.rows.extend(stream.encoded[i] for i in picked)
        self.owners.extend([user] * len(picked))
        self.sft.extend(i not in stream.unlikely_only for i in picked)
        self.anchor.extend(stream.is_anchor(i) for i in picked)
        self.anchor_index.extend(stream.anchor_index(i) for i in picked)

    def add_pairs(self, user: int, picked: Sequence[tuple[int, Any, Any]], *, sft_on_chosen: bool) -> None:
        for index, chosen, rejected in picked:
            self.pairs.append((user, index, len(self.rows)))  # the rejected row follows the chosen one
            self.rows.extend([chosen, rejected])
            self.owners.extend([user, user])
            self.sft.extend([sft_on_chosen, False])
            self.anchor.extend([False, False])
            self.anchor_index.extend([None, None])


def _pack(streams: _Streams, config: TrainingConfig) -> _Rows:
    packed = _Rows()
    for i, stream in enumerate(streams.sft):
        if stream is not None:
            packed.add_sft(i, stream, config.batch_size)
    for i, stream in enumerate(streams.pairs):
        if stream is not None:
            packed.add_pairs(i, stream.take(config.pairs_per_step), sft_on_chosen=config.sft_on_chosen)
    return packed


def _accumulate(
    bank: AdapterBank,
    streams: _Streams,
    tasks: Sequence[SlotTraining],
    parents: Sequence[list[tuple[torch.nn.Parameter, torch.Tensor]]],
    config: TrainingConfig,
    step: int,
    stats: list[_SlotStats],
    pad_id: int,
    frozen: _Frozen,
) -> list[float]:
    """Forward/backward of ``grad_accum_steps`` micro-batches; returns each user's mean loss over them."""
    totals = [0.0] * len(tasks)
    for _ in range(config.grad_accum_steps):
        packed = _pack(streams, config)
        batch = collate(packed.rows, pad_id=pad_id).to(bank.device)
        owner = torch.tensor(packed.owners, device=bank.device)  # [rows]
        with bank.use(SlotPlan.single([tasks[i].slot for i in packed.owners])):
            logits, scored = scored_logits(
                bank.model,
                batch,
                prefix=frozen.prefix,
                layer=frozen.layer,
                sequences=[ids for ids, _ in packed.rows],
            )  # [n, vocab]
            token_loss = torch.nn.functional.cross_entropy(logits, scored.labels, reduction="none")  # [n]
            on_sft = torch.tensor(packed.sft, device=bank.device)[scored.rows]  # [n]
            # a preference user's anchors leave the answer's ends free (``anchor_free_ends``)
            free = [
                streams.free_ends[o] if a else (False, False)
                for a, o in zip(packed.anchor, packed.owners, strict=True)
            ]
            freed = torch.zeros_like(on_sft)  # [n]: scored tokens with no anchor loss
            if any(opening or closing for opening, closing in free):
                free_rows = torch.tensor(free, device=bank.device)[scored.rows]  # [n, 2]: opening, closing
                first, last = row_ends(scored.rows)
                freed = (first & free_rows[:, 0]) | (last & free_rows[:, 1])
                on_sft = on_sft & ~freed
            user_loss, user_tokens = _user_means(token_loss, scored.rows, owner, on_sft, len(tasks))
            objective = config.sft_weight * user_loss
            if config.anchor_unlikelihood > 0 and any(packed.anchor):
                anchor_rows = torch.tensor(packed.anchor, device=bank.device)  # [rows]
                unlikely = anchor_unlikelihood(
                    logits, scored.rows, owner, anchor_rows, streams.personal, labels=scored.labels
                )
                objective = objective + config.anchor_unlikelihood * unlikely
            if config.anchor_distill > 0 and any(packed.anchor):
                kl = anchor_distill(
                    logits,
                    scored.rows,
                    freed,
                    packed.owners,
                    packed.anchor_index,
                    streams.distill,
                    len(tasks),
                )
                objective = objective + config.anchor_distill * kl
            if packed.pairs:
                row_logps = token_loss.new_zeros(len(packed.rows)).index_add(0, scored.rows, -token_loss)
                dpo, margins = batch_dpo(
                    row_logps, packed.pairs, streams.preferences, beta=config.dpo_beta, n_users=len(tasks)
                )  # [users], [pairs]
                objective = objective + config.dpo_weight * dpo
                _record_pairs(stats, packed, dpo.detach(), margins)
            total = objective + _l2_pull(parents, config, device=bank.device)  # [users]
            _check_finite(total, tasks, step, "loss")
            (total.sum() / config.grad_accum_steps).backward()
        for i, (loss, tokens) in enumerate(zip(objective.tolist(), user_tokens.tolist(), strict=True)):
            totals[i] += loss / config.grad_accum_steps
            stats[i].tokens += int(tokens)
    return totals


def anchor_targets(
    bank: AdapterBank,
    streams: Sequence[_UserStream | None],
    tasks: Sequence[SlotTraining],
    config: TrainingConfig,
    pad_id: int,
    frozen: _Frozen,
    *,
    top_k: int = ANCHOR_DISTILL_TOP_K,
) -> list[list[AnchorTargets] | None]:
    """Per task, the base's targets on each of its anchors (in anchor order), for ``anchor_distill``; None for a
    task without anchors, or all None when the term is off. The anchors' encoded rows (those the stream trains
    on) run once through the base (:func:`~lorafleet.training.anchors.base_targets`) before the first step."""
    if config.anchor_distill == 0 or not any(t.anchors for t in tasks):
        return [None] * len(tasks)
    out: list[list[AnchorTargets] | None] = []
    for stream in streams:
        rows = stream.distilled() if stream is not None else []
        out.append(
            base_targets(bank, rows, pad_id=pad_id, prefix=frozen.prefix, layer=frozen.layer, top_k=top_k)
            if rows
            else None
        )
    return out


def _user_means(
    token_loss: torch.Tensor,
    token_rows: torch.Tensor,
    owner: torch.Tensor,
    on_sft: torch.Tensor,
    n_users: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's mean loss over its SFT tokens ``[users]`` (``on_sft``: ``[n]`` bool, which scored tokens count),
    and the tokens of all its rows."""
    token_owner = owner[token_rows]  # [n]
    on_sft = on_sft.to(token_loss.dtype)  # [n]
    user_sum = token_loss.new_zeros(n_users).index_add(0, token_owner, token_loss * on_sft)  # [users]
    sft_tokens = token_loss.new_zeros(n_users).index_add(0, token_owner, on_sft)  # [users]
    all_tokens = token_loss.new_zeros(n_users).index_add(0, token_owner, torch.ones_like(token_loss))
    return user_sum / sft_tokens.clamp(min=1), all_tokens


def _record_pairs(stats: list[_SlotStats], packed: _Rows, dpo: torch.Tensor, margins: torch.Tensor) -> None:
    """Each user's DPO loss and mean reward margin of this micro-batch (users with pairs in it only)."""
    by_user: dict[int, list[float]] = {}
    for (user, _, _), margin in zip(packed.pairs, margins.tolist(), strict=True):
        by_user.setdefault(user, []).append(margin)
    for user, values in by_user.items():
        stats[user].dpo_losses.append(float(dpo[user]))
        stats[user].margins.append(sum(values) / len(values))


@dataclass(frozen=True)
class _Frozen:
    """The job's frozen prefix (None: full depth every step) and the layer its states enter."""

    prefix: FrozenPrefix | None
    layer: int


def user_losses(
    model: Any,
    batch: EncodedBatch,
    owner: torch.Tensor,
    n_users: int,
    *,
    prefix: FrozenPrefix | None = None,
    layer: int = 0,
    sequences: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's mean loss over its own completion tokens ``[users]``, and its token count ``[users]``.

    ``owner[row]`` is the user (0..n_users-1) a row belongs to; call inside the bank's routing context. The job
    loss is the sum of these means, so a user's gradient does not shrink when others bring more tokens. The
    output head runs on completion positions only; with ``prefix`` only layers ``layer..`` run here.
    """
    logits, scored = scored_logits(
        model, batch, prefix=prefix, layer=layer, sequences=sequences
    )  # [n, vocab]
    token_loss = torch.nn.functional.cross_entropy(logits, scored.labels, reduction="none")  # [n]
    every_token = torch.ones_like(scored.rows, dtype=torch.bool)  # [n]
    return _user_means(token_loss, scored.rows, owner, every_token, n_users)


def _l2_pull(
    parents: Sequence[list[tuple[torch.nn.Parameter, torch.Tensor]]],
    config: TrainingConfig,
    *,
    device: torch.device,
) -> torch.Tensor:
    """Per user: ``l2_to_parent`` times the squared distance of its slot to its parent (zeros when off)."""
    if config.l2_to_parent == 0 or not any(parents):
        return torch.zeros(len(parents), device=device)
    zero = torch.zeros((), device=device)
    distances = [sum((((p - target) ** 2).sum() for p, target in pairs), zero) for pairs in parents]
    return config.l2_to_parent * torch.stack(distances)  # [users]


def _check_finite(values: torch.Tensor, tasks: Sequence[SlotTraining], step: int, what: str) -> None:
    """Raise ``TrainingError`` naming the users whose ``values`` (one per task) are NaN or infinite."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = [tasks[i].key for i, ok in enumerate(finite.tolist()) if not ok]
    raise TrainingError(
        f"non-finite {what} at step {step + 1} for users {bad}: nothing from this job may be saved"
    )


def _lora_plus_groups(groups: Sequence[Mapping[str, Any]], ratio_b: float) -> list[dict[str, Any]]:
    """Each slot's group split in two, its A matrices (``lr_scale`` 1) and its B matrices (``lr_scale``
    ``ratio_b``); one group per slot as before when the ratio is 1. ``slot_parameters`` hands out (A, B) pairs."""
    if ratio_b == 1.0:
        return [{**g, "lr_scale": 1.0} for g in groups]
    split = []
    for g in groups:
        split.append({**g, "params": g["params"][0::2], "lr_scale": 1.0})
        split.append({**g, "params": g["params"][1::2], "lr_scale": ratio_b})
    return split


def _clip(
    groups: Sequence[Mapping[str, Any]], tasks: Sequence[SlotTraining], config: TrainingConfig, step: int
) -> None:
    """Clip each slot's gradient norm on its own (over all its groups); a non-finite norm raises."""
    by_slot: dict[int, list[torch.Tensor]] = {}
    for group in groups:
        by_slot.setdefault(group["slot"], []).extend(group["params"])
    norms = []
    for slot_params in by_slot.values():
        params = [p for p in slot_params if p.grad is not None]
        norms.append(
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if params else torch.tensor(0.0)
        )
    _check_finite(torch.stack([n.float().cpu() for n in norms]), tasks, step, "gradient")


def _evaluate_holdouts(
    bank: AdapterBank,
    tokenizer: Any,
    tasks: Sequence[SlotTraining],
    config: TrainingConfig,
    prefix: FrozenPrefix | None,
) -> list[EvalResult]:
    """Every user's holdout through its own slot, all users in shared batches."""
    examples = [e for task in tasks for e in task.holdout]
    routes = [[(task.slot, 1.0)] for task in tasks for _ in task.holdout]
    scores = iter(
        score_examples(
            bank,
            tokenizer,
            examples,
            routes,
            max_seq_len=config.max_seq_len,
            batch_size=EVAL_BATCH_ROWS,
            prefix=prefix,
        )
        if examples
        else []
    )
    return [summarize(_take(scores, len(task.holdout))) for task in tasks]


def _take(items: Iterator[Any], n: int) -> list[Any]:
    return [next(items) for _ in range(n)]


def _metrics(
    task: SlotTraining,
    stats: _SlotStats,
    before: EvalResult,
    after: EvalResult,
    holdout_margins: torch.Tensor,
    config: TrainingConfig,
) -> dict[str, float]:
    tail = stats.step_losses[-TRAIN_LOSS_WINDOW:]
    metrics = {
        "train_loss": sum(tail) / len(tail),
        "train_loss_first": stats.step_losses[0],
        "steps": float(config.max_steps),
        "train_examples": float(len(task.train)),
        "anchor_examples": float(len(task.anchors)),
        "holdout_examples": float(len(task.holdout)),
        "tokens": float(stats.tokens),
    }
    if before.tokens and after.tokens:
        for name, result in (("before", before), ("after", after)):
            metrics[f"holdout_loss_{name}"] = result.loss
            metrics[f"holdout_token_accuracy_{name}"] = result.token_accuracy
            metrics[f"holdout_sequence_accuracy_{name}"] = result.sequence_accuracy
    if stats.dpo_losses:
        metrics["preference_pairs"] = float(len(preference_pairs(task.train, config)))
        metrics["dpo_loss_first"] = stats.dpo_losses[0]
        metrics["dpo_loss"] = _mean(stats.dpo_losses[-TRAIN_LOSS_WINDOW:])
        metrics["reward_margin"] = _mean(stats.margins[-TRAIN_LOSS_WINDOW:])
    if holdout_margins.numel():
        metrics["holdout_preference_pairs"] = float(holdout_margins.numel())
        metrics["holdout_preference_accuracy_after"] = preference_accuracy(holdout_margins)
        metrics["holdout_reward_margin_after"] = float(holdout_margins.mean())
    return metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
