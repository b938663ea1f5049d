"""``TrainingConfig``: the hyper-parameters of one training job, validated once, immutable afterwards.

Defaults were chosen by measurement on the default backbone, SmolLM2-135M-Instruct in nf4 (the README's
"Training defaults" and ``tests/benchmarks/README.md`` give the figures): rank 8 on every linear module of the
top 10 layers (``layers="top 10"``: the frozen layers below run once per example), learning rate 2e-3, 20
steps of 6 sequences per user, 30 % anchor rows with an unlikelihood of 1.0 on the user's own answer tokens
there, warm-up then cosine decay. The seed notes' learning rate of 1e-4 to 3e-4 is for full-depth fine-tuning
of larger models; with a handful of records per user on the top layers it learns nothing in 20-60 steps, so
the typical range below is 1e-4 to 2e-3. Values outside the typical ranges are accepted and named by
:meth:`TrainingConfig.outside_typical_ranges`, which the trainer logs.

Invalid values raise :class:`lorafleet.errors.ValidationError` (a job's config is input, like feedback), never
pydantic's own error, whether the config is built with ``TrainingConfig(...)`` or
:meth:`TrainingConfig.from_mapping`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic import ValidationError as PydanticValidationError

from lorafleet.adapters.slots import SlotConfig
from lorafleet.errors import ValidationError

#: (low, high) of the typical region per field, from the seed notes; outside it is allowed but logged.
TYPICAL_RANGES: dict[str, tuple[float, float]] = {
    "rank": (4, 16),
    "learning_rate": (1e-4, 2e-3),
    "dropout": (0.05, 0.3),
}


#: the training defaults of the services (``lorafleet serve``, ``python -m services.api``, ``lorafleet demo``): the
#: deployment's defaults under every tenant's overrides (``ApiOptions.training``). ``min_epochs`` 2.7 is about the
#: passes a first round's 20 steps make over its rows (the demo's: about 44 rows with anchors, 6 a step), so a
#: first round runs ``max_steps``. A continual round with replay 1.0 has twice a first round's rows, half of them
#: new: ``continual_min_epochs`` 4 runs it about 48 steps. At 2.7 passes (33 steps) QA rejected the two-user demo's
#: round two (6 answers better, 1 worse than round one; signed-rank p=0.086); at 4 it promoted it (8 better, 0
#: worse). ``lr_ratio_b`` 4 (LoRA+: the B matrices learn at 4x the rate) with ``anchor_distill`` 0.5 (the anchors
#: keep the base's whole next-token distribution) answer 0.94 of round one's unseen paraphrases against 0.90 at
#: the same steps, and drift less from the base on general text (KL 0.18 against 0.44; seeds 0-2,
#: tests/benchmarks/README.md, "LoRA+ with anchor distillation"). The library's ``TrainingConfig`` itself stays
#: exact (``max_steps``, one learning rate, no distillation) for scripts and tests
SERVICE_TRAINING_DEFAULTS: dict[str, Any] = {
    "min_epochs": 2.7,
    "continual_min_epochs": 4.0,
    "lr_ratio_b": 4.0,
    "anchor_distill": 0.5,
}


class TrainingConfig(BaseModel):
    """Hyper-parameters of a training job; every user trained in the job uses the same ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(default=8, ge=1, le=64, strict=True)
    alpha: float = Field(default=16.0, gt=0.0, le=1024.0, allow_inf_nan=False)
    dropout: float = Field(default=0.05, ge=0.0, le=0.5)
    #: PEFT's names: ``all-linear``, a regex string, or a list of module names/suffixes
    target_modules: str | list[str] = "all-linear"
    #: which decoder layers get adapters (PEFT's ``layers_to_transform``): ``"all"``, ``"top N"`` (the N layers
    #: nearest the output, all of them on a smaller model) or a list of layer indices. Below the lowest adapted layer nothing depends on an
    #: adapter, so training computes those layers once per example (the frozen-prefix cache).
    layers: str | list[int] = "top 10"
    learning_rate: float = Field(default=2e-3, ge=1e-5, le=1e-2)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    #: LoRA+ (Hayou et al., 2024): the B matrices learn at ``learning_rate`` times this, the A matrices at
    #: ``learning_rate`` (1 = one learning rate for both, as plain LoRA)
    lr_ratio_b: float = Field(default=1.0, ge=1.0, le=64.0, allow_inf_nan=False)
    #: share of the steps spent warming the learning rate up linearly; cosine decay to 0 afterwards
    warmup_ratio: float = Field(default=0.1, ge=0.0, le=0.5)
    #: optimizer steps per job, the same for every user of the job (users train together)
    max_steps: int = Field(default=20, ge=1, le=100_000, strict=True)
    #: a job runs at least this many passes over its largest user's rows (examples and anchors): more steps than
    #: ``max_steps`` when a round brings more data, so each row is seen about as often as in a first round. 0 (the
    #: library's default) trains exactly ``max_steps``; the services queue jobs with ``SERVICE_TRAINING_DEFAULTS``
    min_epochs: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    #: ``min_epochs`` for a user whose adapter continues a parent version (None: ``min_epochs``). A continual
    #: round's rows are half new records and half replayed ones, so it may need more passes than a first round
    #: for the new facts to be learnt as well as round one's were
    continual_min_epochs: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    #: sequences per user per micro-step
    batch_size: int = Field(default=6, ge=1, le=1024, strict=True)
    grad_accum_steps: int = Field(default=1, ge=1, le=1024, strict=True)
    #: gradient-norm clipping, applied to each user's slot separately (one user cannot squeeze another)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e6)
    max_seq_len: int = Field(default=256, ge=8, le=32_768, strict=True)
    #: share of each user's training rows that are anchors: general prompts answered by the base model itself
    #: (self-distillation), which keep an adapter from answering everything with its user's facts (0 = off)
    anchor_ratio: float = Field(default=0.3, ge=0.0, le=0.9)
    #: weight of an unlikelihood term on the anchor rows: at every answer position of an anchor, the probability
    #: the adapter gives to its user's own answer tokens (tokens of the user's completions that none of its
    #: prompts or anchor answers use: the names, places and habits it is taught) is pushed down, ``-log(1 - p)``,
    #: so general prompts are not answered with personal facts (0 = off). Measured on the default backbone (round
    #: 1, seeds 0-2): 1.0 raised the median share of clean general answers from 76.2 % to 85.7 % for one unseen
    #: paraphrase in 48 on two seeds (median accuracy 0.90 -> 0.88); on seed 0, 2.0 and 5.0 gave 91.3 % and
    #: 93.7 % clean at 0.90 and 0.88 accuracy (88.9 % at 0.96 for 1.0)
    anchor_unlikelihood: float = Field(default=1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    #: on the anchor rows of a user with preference pairs in the job (``dpo_weight`` > 0), which answer tokens carry
    #: no loss: ``auto`` the ends where the user's own pairs differ (``anchors.free_answer_ends``: a greeting frees
    #: the first answer token, a sign-off or a shorter answer the end of turn), ``closing`` the end of turn,
    #: ``both`` both, ``none`` neither. The anchors keep the content of general answers while a preferred closing or
    #: opening stays free, which anchors would otherwise train away. Users without pairs train on every anchor
    #: token. Measured on the default backbone (docs/preference-learning.md): ``closing`` kept more of a sign-off
    #: user's general answers than ``none`` at every anchor share, and ``both`` let it open answers with the
    #: sign-off; ``auto`` (the sign-off's closing, a greeting's opening) took a casual user's greeting from 50 %
    #: to 100 % of unseen general answers at the services' defaults, for 2 of 18 general facts
    anchor_free_ends: Literal["none", "closing", "both", "auto"] = "auto"
    #: weight of anchor distillation (Learning without Forgetting, Li & Hoiem 2016): on every anchor row's answer
    #: positions the objective adds this times KL(base || adapter) over the base model's next-token distribution
    #: (its top 32 log-probs and the rest's mass, computed once per job), a user's mean over its anchor positions;
    #: 0 = off. The anchors then keep the base's whole distribution, not only its greedy token
    anchor_distill: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    #: contrast rows per training row of a user (``lorafleet.training.contrast``; 0 = off, at most one a row): a
    #: seeded sample of the user's own questions asked about a third party ("Where does Sam live?") with the
    #: user's answer, trained as anchors with no likelihood on that answer and no distillation, so the anchor
    #: unlikelihood teaches the adapter whose facts it holds (so none without anchors or with
    #: ``anchor_unlikelihood`` 0). Users only: a shared task's rows give none. Measured
    #: on the default backbone at the services' defaults (round 1, seeds 0-2), 1.0 raised the median share of
    #: general answers free of personal values from 90.5 % to 94.4 % and cost a tenth of the facts (median
    #: accuracy 0.94 -> 0.83) at about 1.4x the training time: a tenant's choice, not a default
    contrast_ratio: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    #: replayed old records per new record in continual learning (read by ``training.continual``)
    replay_ratio: float = Field(default=1.0, ge=0.0, le=10.0)
    #: weight of the L2 pull of each slot towards its parent's weights (0 = off)
    l2_to_parent: float = Field(default=0.0, ge=0.0, le=1e4)
    holdout_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    #: ratings with a score at or above this become training examples; lower ones are excluded
    rating_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    #: weight of each user's SFT loss (its completions, ratings and anchors) in the user's objective
    sft_weight: float = Field(default=1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    #: weight of each user's DPO loss on its preference pairs (``lorafleet.training.preference``); 0 (the default)
    #: trains a preference's chosen answer as SFT instead, as before preference learning existed
    dpo_weight: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False, validate_default=True)
    #: DPO's beta: how far (in log-ratio to the reference) a pair's implicit rewards move before the loss saturates
    dpo_beta: float = Field(default=0.1, gt=0.0, le=10.0, allow_inf_nan=False)
    #: preference pairs per user per micro-step (two rows each: chosen and rejected) when ``dpo_weight`` > 0
    pairs_per_step: int = Field(default=4, ge=1, le=512, strict=True)
    #: with DPO on, each pair's chosen answer also counts in the user's SFT loss, weighted by ``sft_weight`` (an NLL
    #: term on the chosen answers beside DPO, as in RPO): the pair's chosen row, already in the batch, so no extra
    #: rows. On by default: on the real backbone it made greedy answers follow the preference and kept more of the
    #: base's answers than DPO alone (docs/preference-learning.md); ``sft_weight`` 0 turns it off with the rest of SFT
    sft_on_chosen: bool = Field(default=True, strict=True)
    seed: int = Field(default=0, ge=0, le=2**63 - 1, strict=True)

    @field_validator("dpo_weight")
    @classmethod
    def _some_objective(cls, value: float, info: ValidationInfo) -> float:
        if value == 0 and info.data.get("sft_weight") == 0:
            raise ValueError("0 with sft_weight 0 as well: nothing would be trained")
        return value

    @property
    def trains_preferences(self) -> bool:
        """Whether preference pairs train with DPO (else their chosen answer trains as SFT)."""
        return self.dpo_weight > 0

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except PydanticValidationError as exc:
            raise invalid_fields(exc, what="training config", whole="config") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TrainingConfig:
        """Build from a mapping (e.g. a job's stored JSON); unknown keys and bad values raise ValidationError."""
        if data is not None and not isinstance(data, Mapping):
            raise ValidationError(f"training config must be an object, got {type(data).__name__}")
        return cls(**dict(data or {}))

    def steps_for(self, rows: int, *, continuing: bool = False) -> int:
        """Optimizer steps for a user with ``rows`` training rows: ``max_steps``, or more to make ``min_epochs``
        passes over them (``continual_min_epochs`` when ``continuing`` a parent version). A job runs the most
        any of its users needs."""
        per_step = self.batch_size * self.grad_accum_steps
        passes = self.min_epochs
        if continuing and self.continual_min_epochs is not None:
            passes = self.continual_min_epochs
        return max(self.max_steps, math.ceil(passes * rows / per_step))

    def with_changes(self, **changes: Any) -> TrainingConfig:
        """A validated copy with some fields changed (``model_copy(update=...)`` would skip validation)."""
        return TrainingConfig(**{**self.model_dump(), **changes})

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be blank")
        if isinstance(value, list) and (not value or any(not str(v).strip() for v in value)):
            raise ValueError("must be a non-empty list of non-blank module names")
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _no_bool_layers(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise ValueError("layer indices must be integers")
        return value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list):
            if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
                raise ValueError("must be 'all', 'top N' or a non-empty list of layer indices >= 0")
            if len(set(value)) != len(value):
                raise ValueError("layer indices must not repeat")
            return sorted(value)
        if value == "all":
            return value
        parts = value.split()
        if len(parts) == 2 and parts[0] == "top" and parts[1].isdigit() and int(parts[1]) >= 1:
            return f"top {int(parts[1])}"
        raise ValueError("must be 'all', 'top N' (N >= 1) or a list of layer indices")

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The adapted layers of a model with ``num_layers`` decoder layers (None: all of them).

        ``ValidationError`` when the setting names a layer the model does not have.
        """
        if self.layers == "all":
            return None
        if isinstance(self.layers, str):  # "top N" on a model of fewer layers means all of them
            n = min(int(self.layers.split()[1]), num_layers)
            return list(range(num_layers - n, num_layers))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValidationError(f"layers: {bad} out of range; the backbone has {num_layers} layers")
        return list(self.layers)

    def slot_config(self, *, layer_names: Iterable[str] | None = None, **labels: Any) -> SlotConfig:
        """The ``SlotConfig`` for a fresh slot of this job (``labels``: name, backbone_fingerprint, ...).

        A regex ``target_modules`` is resolved against ``layer_names`` (the bank's layers), since a slot records
        plain module names; ``layers`` is resolved by the bank when it initialises the slot.
        """
        from lorafleet.adapters.bank import module_matches  # torch: the config itself is torch-free

        targets: tuple[str, ...] | None
        if self.target_modules == "all-linear":
            targets = None
        elif isinstance(self.target_modules, list):
            targets = tuple(self.target_modules)
        elif layer_names is None:
            raise ValidationError("a regex target_modules needs the bank's layer names to resolve")
        else:
            targets = tuple(n for n in layer_names if module_matches(n, self.target_modules))
            if not targets:
                raise ValidationError(f"target_modules {self.target_modules!r} match no layer of the bank")
        layers = (
            None
            if self.layers == "all"
            else self.layers
            if isinstance(self.layers, str)
            else tuple(self.layers)
        )
        return SlotConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=targets,
            layers=layers,
            **labels,
        )

    def outside_typical_ranges(self) -> list[str]:
        """Human-readable notes for values outside the seed notes' typical region (empty when all are inside)."""
        notes = []
        for name, (low, high) in TYPICAL_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                notes.append(f"{name}={value:g} is outside the typical range {low:g}-{high:g}")
        return notes


def invalid_fields(exc: PydanticValidationError, *, what: str, whole: str) -> ValidationError:
    """One lorafleet error naming every bad field of ``what`` (``field: message``; ``whole``: no one field)."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or whole
        parts.append(f"{field}: {str(error['msg']).removeprefix('Value error, ')}")
    return ValidationError(f"invalid {what}: " + "; ".join(parts))
