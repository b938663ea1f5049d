"""Where a training job's ``TrainingConfig`` comes from: defaults, then the tenant's overrides, then the job's.

Layers, lowest first: ``TrainingConfig``'s own defaults; the deployment's defaults (``ApiOptions.training``,
given to the ``Scheduler``); the tenant's overrides (``tenants.training_config``, set with
``PUT /v1/training-config`` or ``lorafleet training-config set``); the job's own (the ``training`` object of
``POST .../train``). The scheduler resolves them when it queues a job and stores the result in the job's
payload (``payload["training"]``), so a job trains with the config it was queued with, whatever changes later.

Overrides are checked field by field through ``TrainingConfig``: a ``ValidationError`` names the field
(``learning_rate: ...``, or ``training.rank: ...`` for a job's) and nothing is stored or queued. A trainer's
adapter bank holds ranks up to ``LORAFLEET_TRAINER_MAX_RANK`` on every linear layer; ``check_bank_fits`` is the
trainer's own check of a job's config against its bank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.errors import ValidationError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.config import TrainingConfig

#: the overridable settings: every field of ``TrainingConfig``
TRAINING_FIELDS: tuple[str, ...] = tuple(TrainingConfig.model_fields)
MAX_RANK_SETTING = "LORAFLEET_TRAINER_MAX_RANK"
#: what ``TrainingConfig`` puts before its ``field: message`` parts
_CONFIG_ERROR_PREFIX = "invalid training config: "


@dataclass(frozen=True)
class TenantTraining:
    """A tenant's overrides, and the config its jobs get from them (the defaults with the overrides on top)."""

    overrides: dict[str, Any]
    effective: TrainingConfig


def validate_overrides(data: object, *, field: str = "", max_rank: int | None = None) -> dict[str, Any]:
    """``data`` checked field by field through ``TrainingConfig`` and normalised (JSON values, e.g. ``layers``
    sorted); None is no overrides. Errors are ``ValidationError`` naming ``<field>.<name>`` (or ``<name>``)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValidationError(f"{field or 'training_config'}: must be an object of TrainingConfig fields")
    prefix = f"{field}." if field else ""
    checked: dict[str, Any] = {}
    for name, value in data.items():
        config = _one_field(str(name), value, prefix=prefix)
        checked[str(name)] = config.model_dump(mode="json", include={str(name)})[str(name)]
    if max_rank is not None and "rank" in checked:
        check_rank(checked["rank"], max_rank=max_rank, field=field)
    return checked


def _one_field(name: str, value: object, *, prefix: str) -> TrainingConfig:
    """A config with only ``name`` set; its error re-worded to start with ``<prefix><name>``."""
    try:
        return TrainingConfig.from_mapping({name: value})
    except ValidationError as exc:
        raise ValidationError(prefix + str(exc).removeprefix(_CONFIG_ERROR_PREFIX)) from None


def effective_config(*layers: Mapping[str, Any] | None) -> TrainingConfig:
    """``TrainingConfig``'s defaults with each layer of overrides on top, lowest first (None: an empty layer)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    validate_overrides(merged)  # names the field of a bad stored value
    return TrainingConfig.from_mapping(merged)


def check_rank(rank: int, *, max_rank: int, field: str = "") -> None:
    """Refuse a rank above the trainers' maximum (their banks cannot hold it)."""
    if rank > max_rank:
        name = f"{field}.rank" if field else "rank"
        raise ValidationError(
            f"{name}: {rank} is above the trainers' maximum rank {max_rank} ({MAX_RANK_SETTING})"
        )


def check_bank_fits(config: TrainingConfig, *, max_rank: int, layer_names: Iterable[str]) -> None:
    """The trainer's check that its bank can hold a job's adapters: the rank, every listed target module (a
    regex is resolved by ``TrainingConfig.slot_config``), and the layers."""
    from lorafleet.adapters.bank import (  # torch: only trainers check a bank; the scheduler and API do not
        layer_of,
        module_matches,
        on_layers,
    )

    check_rank(config.rank, max_rank=max_rank)
    names = list(layer_names)
    if isinstance(config.target_modules, list):
        missing = [t for t in config.target_modules if not any(module_matches(n, [t]) for n in names)]
        if missing:
            leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
            raise ValidationError(
                f"target_modules: {missing} match no layer of the trainer's bank ({leaves})"
            )
    config.slot_config(layer_names=names)
    layers = [i for i in (layer_of(n) for n in names) if i is not None]
    config.layer_indices(max(layers) + 1 if layers else 0)  # names a layer the backbone lacks: refused
    if not on_layers(names, config.slot_config(layer_names=names).layers):
        raise ValidationError(f"layers: {config.layers!r} match no layer of the trainer's bank")


def job_training(
    db: Database,
    *,
    tenant_id: int,
    defaults: Mapping[str, Any] | None = None,
    job: Mapping[str, Any] | None = None,
    max_rank: int | None = None,
) -> dict[str, Any]:
    """The effective config of a job of this tenant, as its payload stores it (read in the queuing
    transaction it joins); with ``max_rank``, a rank the trainers cannot hold is refused."""
    overrides = TenantRepository(db).get_training_overrides(tenant_id=tenant_id)
    config = effective_config(defaults, overrides, job)
    if max_rank is not None:
        check_rank(config.rank, max_rank=max_rank)
    return config.model_dump(mode="json")


def get_tenant_training(
    db: Database, *, tenant_id: int, defaults: Mapping[str, Any] | None = None
) -> TenantTraining:
    """The tenant's overrides and effective config; NotFoundError for no such tenant."""
    overrides = TenantRepository(db).get_training_overrides(tenant_id=tenant_id)
    return TenantTraining(overrides, effective_config(defaults, overrides))


def set_tenant_training(
    db: Database,
    *,
    tenant_id: int,
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    max_rank: int | None = None,
) -> TenantTraining:
    """Replace the tenant's overrides (``{}`` resets them); invalid ones raise before anything is stored."""
    checked = validate_overrides(overrides, max_rank=max_rank)
    effective = effective_config(defaults, checked)
    TenantRepository(db).set_training_overrides(tenant_id=tenant_id, overrides=checked)
    return TenantTraining(checked, effective)


__all__ = [
    "MAX_RANK_SETTING",
    "TRAINING_FIELDS",
    "TenantTraining",
    "check_bank_fits",
    "check_rank",
    "effective_config",
    "get_tenant_training",
    "job_training",
    "set_tenant_training",
    "validate_overrides",
]
