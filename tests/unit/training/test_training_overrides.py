"""Training settings per tenant and per job (``lorafleet.training.overrides``): every error names its field and
changes nothing, the layers resolve lowest first, tenants' overrides round-trip on SQLite and PostgreSQL, and a
trainer's bank refuses what it cannot hold."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.sdk import schemas
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.config import TrainingConfig
from lorafleet.training.overrides import (
    TRAINING_FIELDS,
    check_bank_fits,
    effective_config,
    get_tenant_training,
    set_tenant_training,
    validate_overrides,
)

#: module names of a two-layer Llama bank on every linear layer (as ``TrainerHost`` injects it)
BANK_LAYERS = [
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def test_overrides_are_checked_and_normalised_through_training_config() -> None:
    given = {"learning_rate": 1e-3, "layers": [1, 0], "target_modules": ["q_proj"], "max_steps": 5}
    assert validate_overrides(given) == {
        "learning_rate": 1e-3,
        "layers": [0, 1],
        "target_modules": ["q_proj"],
        "max_steps": 5,
    }
    assert validate_overrides({"layers": "top  2"}) == {"layers": "top 2"}
    assert validate_overrides(None) == {} and validate_overrides({}) == {}


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"learning_rate": 1.0}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"rank": 4.0}, "rank"),
        ({"rank": None}, "rank"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"layers": "bottom 2"}, "layers"),
        ({"target_modules": []}, "target_modules"),
        ({"max_steps": 8, "dropout": 0.9}, "dropout"),
    ],
)
def test_an_invalid_override_is_an_error_naming_its_field(given: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as bare:
        validate_overrides(given)
    assert str(bare.value).startswith(f"{field}: ")
    with pytest.raises(ValidationError) as nested:
        validate_overrides(given, field="training")
    assert str(nested.value).startswith(f"training.{field}: ")


def test_not_an_object_and_a_rank_above_the_maximum_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"^training: must be an object"):
        validate_overrides([("rank", 4)], field="training")
    with pytest.raises(ValidationError, match=r"^rank: 32 is above .* 16 \(LORAFLEET_TRAINER_MAX_RANK\)"):
        validate_overrides({"rank": 32}, max_rank=16)
    with pytest.raises(ValidationError, match=r"^training\.rank: 17 is above"):
        validate_overrides({"rank": 17}, field="training", max_rank=16)
    assert validate_overrides({"rank": 16}, max_rank=16) == {"rank": 16}


def test_layers_resolve_lowest_first_over_training_config_defaults() -> None:
    config = effective_config(
        {"rank": 4, "max_steps": 10}, None, {"max_steps": 20, "learning_rate": 1e-3}, {"max_steps": 30}
    )
    assert (config.rank, config.max_steps, config.learning_rate) == (4, 30, 1e-3)
    assert config.alpha == TrainingConfig().alpha
    assert effective_config() == TrainingConfig()


def test_the_sdk_schema_has_every_training_config_field() -> None:
    assert set(schemas.TrainingOverrides.model_fields) == set(TRAINING_FIELDS)
    assert set(schemas.TrainingValues.model_fields) == set(TRAINING_FIELDS)
    values = schemas.TrainingValues.model_validate(TrainingConfig().model_dump(mode="json"))
    assert TrainingConfig.from_mapping(values.given()) == TrainingConfig()


# --- a trainer's bank ---------------------------------------------------------------------------------------
def test_a_bank_on_every_linear_layer_holds_subsets_of_modules_layers_and_ranks() -> None:
    for given in (
        {},
        {"rank": 16, "target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*mlp\..*", "layers": "top 1"},
        {"layers": [0]},
        {"layers": "top 3"},  # more than the model has: all of them
    ):
        check_bank_fits(_config(**given), max_rank=16, layer_names=BANK_LAYERS)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rank": 32}, r"^rank: 32 is above the trainers' maximum rank 16"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"^target_modules: \['lm_head'\] match no layer"),
        ({"target_modules": r".*\.nothing"}, r"^target_modules .* match no layer"),
        ({"layers": [5]}, r"^layers: \[5\] out of range"),
    ],
)
def test_what_the_bank_cannot_hold_is_refused_naming_the_field(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check_bank_fits(_config(**given), max_rank=16, layer_names=BANK_LAYERS)


def _config(**given: Any) -> TrainingConfig:
    """A config on every layer unless ``given`` says otherwise (whatever the default ``layers`` is)."""
    return TrainingConfig(**{"layers": "all", **given})


# --- a tenant's overrides ----------------------------------------------------------------------------------
def _stored(db: Database, tenant_id: int) -> Any:
    with db.session() as session:
        return session.scalar(select(SqlTenant.training_config).where(SqlTenant.id == tenant_id))


def test_a_tenants_overrides_round_trip_and_reset(database: Database) -> None:
    repo = TenantRepository(database)
    acme = repo.create_tenant(name="acme")[0].id
    other = repo.create_tenant(name="other")[0].id
    assert get_tenant_training(database, tenant_id=acme).overrides == {}

    saved = set_tenant_training(database, tenant_id=acme, overrides={"learning_rate": 1e-3, "layers": [1, 0]})
    assert saved.overrides == {"learning_rate": 1e-3, "layers": [0, 1]}
    assert (saved.effective.learning_rate, saved.effective.layers) == (1e-3, [0, 1])
    found = get_tenant_training(database, tenant_id=acme, defaults={"max_steps": 7, "learning_rate": 5e-4})
    assert found.overrides == saved.overrides
    assert (found.effective.max_steps, found.effective.learning_rate) == (7, 1e-3)  # the tenant's wins
    assert get_tenant_training(database, tenant_id=other).overrides == {}
    assert repo.get_training_overrides(tenant_id=acme) == saved.overrides

    reset = set_tenant_training(database, tenant_id=acme, overrides={})
    assert reset.overrides == {} and reset.effective == TrainingConfig()
    assert _stored(database, acme) is None


def test_invalid_overrides_change_nothing(database: Database) -> None:
    acme = TenantRepository(database).create_tenant(name="acme")[0].id
    set_tenant_training(database, tenant_id=acme, overrides={"max_steps": 12})
    for bad, field in (({"max_steps": 0}, "max_steps"), ({"rank": 32}, "rank"), ({"lr": 1e-3}, "lr")):
        with pytest.raises(ValidationError, match=rf"^{field}: "):
            set_tenant_training(database, tenant_id=acme, overrides={"seed": 3, **bad}, max_rank=16)
    assert _stored(database, acme) == {"max_steps": 12}
    with pytest.raises(NotFoundError):
        set_tenant_training(database, tenant_id=acme + 100, overrides={"seed": 1})
    with pytest.raises(NotFoundError):
        get_tenant_training(database, tenant_id=acme + 100)


def test_a_stored_value_that_no_longer_validates_is_named(database: Database) -> None:
    acme = TenantRepository(database).create_tenant(name="acme")[0].id
    TenantRepository(database).set_training_overrides(tenant_id=acme, overrides={"rank": 0})
    with pytest.raises(ValidationError, match=r"^rank: "):
        get_tenant_training(database, tenant_id=acme)
