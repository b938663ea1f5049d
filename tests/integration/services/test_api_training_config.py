"""Training settings through the HTTP API and the SDK (sync and async): a tenant's overrides round-trip and reset,
bad fields are 422 naming them and change nothing, and jobs queued on demand carry the effective config (the
tenant's overrides with the request's ``training`` on top), shown by ``GET /v1/jobs/{id}``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from api_helpers import ApiServer, TenantHandle, sft

from lorafleet.sdk import AsyncClient, errors, schemas
from lorafleet.training.config import TrainingConfig

DEFAULTS = TrainingConfig().model_dump(mode="json")


def test_a_tenants_overrides_round_trip_and_reset(make_tenant: Callable[[], TenantHandle]) -> None:
    client, other = make_tenant().client, make_tenant().client
    start = client.get_training_config()
    assert (start.overrides, start.effective.given(), start.max_rank) == ({}, DEFAULTS, 16)

    saved = client.set_training_config(
        {"learning_rate": 1e-3, "layers": [1, 0], "target_modules": ["q_proj"]}
    )
    assert saved.overrides == {"learning_rate": 1e-3, "layers": [0, 1], "target_modules": ["q_proj"]}
    found = client.get_training_config()
    assert found == saved
    assert (found.effective.learning_rate, found.effective.layers, found.effective.rank) == (1e-3, [0, 1], 8)
    assert other.get_training_config().overrides == {}  # one tenant's settings are its own

    typed = client.set_training_config(schemas.TrainingOverrides(max_steps=12))
    assert typed.overrides == {"max_steps": 12}  # replaced, not merged
    assert client.set_training_config({}).overrides == {}
    assert client.get_training_config().effective.given() == DEFAULTS


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"learning_rate": 1.0}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"rank": 32}, "rank"),
        ({"rank": 4.5}, "rank"),
        ({"max_steps": None}, "max_steps"),
        ({"learning_rte": 1e-3}, "learning_rte"),
        ({"layers": "bottom 3"}, "layers"),
    ],
)
def test_a_bad_field_is_422_naming_it_and_changes_nothing(
    tenant: TenantHandle, body: dict[str, Any], field: str
) -> None:
    client = tenant.client
    client.set_training_config({"seed": 3})
    with pytest.raises(errors.ValidationFailed) as caught:
        client.set_training_config({"max_steps": 10, **body})
    assert caught.value.status == 422 and caught.value.field == field, caught.value
    assert client.get_training_config().overrides == {"seed": 3}


def test_the_routes_need_a_tenant_key(api: ApiServer, make_tenant: Callable[[], TenantHandle]) -> None:
    make_tenant()
    for method in ("GET", "PUT"):
        assert httpx.request(method, f"{api.url}/v1/training-config", json={}).status_code == 401
    assert (
        httpx.put(f"{api.url}/v1/training-config", json=[1], headers=_auth(make_tenant())).status_code == 422
    )


def test_jobs_queued_now_carry_the_tenants_config_with_the_requests_on_top(
    tenant: TenantHandle,
) -> None:
    client = tenant.client
    client.set_training_config({"learning_rate": 1e-3, "max_steps": 40})
    client.submit_feedback("ann", [sft("q1"), sft("q2")])
    client.submit_task_feedback("sql", [sft("q3")])

    job = client.train("ann", training={"max_steps": 5, "rank": 4}).job
    assert job.training is not None
    assert (job.training.max_steps, job.training.rank, job.training.learning_rate) == (5, 4, 1e-3)
    task_job = client.train_task("sql", training=schemas.TrainingOverrides(seed=9)).job
    assert task_job.training is not None and (task_job.training.seed, task_job.training.max_steps) == (9, 40)

    client.set_training_config({})  # a queued job keeps the config it was queued with
    shown = client.get_job(job.id).training
    assert shown is not None and shown.given() == {
        **DEFAULTS,
        "learning_rate": 1e-3,
        "max_steps": 5,
        "rank": 4,
    }
    assert [j.training for j in client.list_jobs(user="ann")] == [shown]


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"learning_rate": 0.5}, "training.learning_rate"),
        ({"rank": 17}, "training.rank"),
        ({"max_steps": "many"}, "training.max_steps"),
        ({"epochs": 3}, "training.epochs"),
    ],
)
def test_a_bad_job_override_is_422_naming_it_and_queues_nothing(
    tenant: TenantHandle, training: dict[str, Any], field: str
) -> None:
    client = tenant.client
    client.submit_feedback("ann", [sft("q1")])
    client.submit_task_feedback("sql", [sft("q2")])
    for submit in (
        lambda: client.train("ann", training=training),
        lambda: client.train_task("sql", training=training),
    ):
        with pytest.raises(errors.ValidationFailed) as caught:
            submit()
        assert caught.value.field == field, caught.value
    assert client.list_jobs() == []


def test_a_tenant_rank_the_trainers_cannot_hold_is_refused_when_queued(
    tenant: TenantHandle,
) -> None:
    client = tenant.client
    client.submit_feedback("ann", [sft("q1")])
    with pytest.raises(errors.ValidationFailed) as caught:
        client.set_training_config({"rank": 24})
    assert caught.value.field == "rank" and "LORAFLEET_TRAINER_MAX_RANK" in str(caught.value)
    job = client.train("ann", training={"rank": 16}).job
    assert job.training is not None and job.training.rank == 16


def test_the_async_client_gets_and_sets_the_same(api: ApiServer, tenant: TenantHandle) -> None:

    async def run() -> tuple[schemas.TrainingConfigOut, schemas.TrainingConfigOut, str | None]:
        async with AsyncClient(api.url, tenant.api_key, max_retries=0) as client:
            saved = await client.set_training_config({"dropout": 0.1})
            found = await client.get_training_config()
            try:
                await client.set_training_config({"dropout": 0.9})
            except errors.ValidationFailed as exc:
                return saved, found, exc.field
            return saved, found, None

    saved, found, field = asyncio.run(run())
    assert saved == found and found.overrides == {"dropout": 0.1} and field == "dropout"
    assert tenant.client.get_training_config().overrides == {"dropout": 0.1}


def _auth(tenant: TenantHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.api_key}"}
