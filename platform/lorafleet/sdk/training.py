"""Training-config bodies of the HTTP API (re-exported by ``lorafleet.sdk.schemas``): a tenant's overrides
(``GET``/``PUT /v1/training-config``) and a job's own (the ``training`` object of ``POST .../train``).

The fields are those of ``lorafleet.training.config.TrainingConfig``, each optional and only type-checked here:
the service checks the ranges (its 422 names the field, e.g. ``training.learning_rate``), so the SDK needs no
torch and keeps no second copy of the limits.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt

from lorafleet.domain.text import printable_name

__all__ = ["TrainRequest", "TrainingConfigOut", "TrainingOverrides", "TrainingValues"]


#: a module pattern or a layer spec: printable (a control character there is a mistake, never a pattern)
Spec = Annotated[str, AfterValidator(printable_name)]


class _TrainingFields(BaseModel):
    """Every ``TrainingConfig`` field, None when not given (see that class for meanings and ranges)."""

    rank: StrictInt | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: Spec | list[Spec] | None = Field(
        default=None, description="'all-linear', a regex, or module names/suffixes."
    )
    layers: Spec | list[StrictInt] | None = Field(
        default=None, description="'all', 'top N' or a list of decoder layer indices."
    )
    learning_rate: float | None = None
    weight_decay: float | None = None
    lr_ratio_b: float | None = None
    warmup_ratio: float | None = None
    max_steps: StrictInt | None = None
    min_epochs: float | None = None
    continual_min_epochs: float | None = None
    batch_size: StrictInt | None = None
    grad_accum_steps: StrictInt | None = None
    max_grad_norm: float | None = None
    max_seq_len: StrictInt | None = None
    replay_ratio: float | None = None
    anchor_ratio: float | None = None
    anchor_unlikelihood: float | None = None
    anchor_free_ends: str | None = Field(
        default=None,
        description="'auto' (the default: the ends the user's pairs change), 'closing', 'both' or 'none'.",
    )
    anchor_distill: float | None = None
    contrast_ratio: float | None = None
    l2_to_parent: float | None = None
    holdout_fraction: float | None = None
    rating_threshold: float | None = None
    sft_weight: float | None = None
    dpo_weight: float | None = None
    dpo_beta: float | None = None
    pairs_per_step: StrictInt | None = None
    sft_on_chosen: StrictBool | None = None
    seed: StrictInt | None = None

    def given(self) -> dict[str, JsonValue]:
        """The fields that were set, as JSON values (what a request sends)."""
        return self.model_dump(mode="json", exclude_unset=True)


class TrainingOverrides(_TrainingFields):
    """``TrainingConfig`` fields to override; the ones left out keep the value of the layer below."""

    model_config = ConfigDict(extra="forbid")


class TrainingValues(_TrainingFields):
    """A complete training config as the service resolved it (fields of a newer server are kept)."""

    model_config = ConfigDict(extra="allow")


class TrainingConfigOut(BaseModel):
    """A tenant's training settings: its overrides, and the config its jobs get (defaults + overrides)."""

    model_config = ConfigDict(extra="allow")

    overrides: dict[str, JsonValue] = Field(description="The tenant's overrides ({}: none).")
    effective: TrainingValues = Field(description="The defaults with the tenant's overrides on top.")
    max_rank: int = Field(description="The largest rank the trainers hold (LORAFLEET_TRAINER_MAX_RANK).")


class TrainRequest(BaseModel):
    """The optional body of ``POST /v1/users/{user_id}/train`` and ``POST /v1/tasks/{task}/train``."""

    model_config = ConfigDict(extra="forbid")

    training: TrainingOverrides | None = Field(
        default=None,
        description="This job's overrides, on top of the tenant's (see GET /v1/training-config).",
    )
