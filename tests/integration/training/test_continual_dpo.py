"""A train job with DPO on, run by a real ``JobWorker`` and ``ContinualTrainer`` on the nf4 tiny backbone (SQLite:
the database is not the point): a first version's reference is the base, a continued version's is its parent."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
from continual_helpers import TINY_TRAINING, get_job
from tests.torch_threads import one_torch_thread

from lorafleet.jobs import JobQueue, JobWorker, Scheduler
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.training.overrides import set_tenant_training
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer
from lorafleet.workflows.feedback import ingest_feedback

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One torch thread: the tiny model gains nothing from two, and on shared cores a second one spin-waits."""
    with one_torch_thread():
        yield


def preferences(start: int, n: int) -> list[dict[str, str]]:
    return [
        {
            "kind": "preference",
            "prompt": f"Can you help with item {i}?",
            "chosen": f"Sure, item {i}.",
            "rejected": f"Nope, item {i}.",
        }
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_dpo_jobs_train_against_the_base_then_against_the_parent_version(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    dpo = {**TINY_TRAINING, "dpo_weight": 1.0, "dpo_beta": 0.5, "dropout": 0.0, "pairs_per_step": 4}
    set_tenant_training(database, tenant_id=tenant_id, overrides=dpo)
    queue = JobQueue(database)
    worker = JobWorker(queue, worker_id="w1", handlers={"train": make_trainer(promote_rule="always").run_job})
    versions = []
    for start, n in ((0, 12), (100, 8)):
        ingest_feedback(database, tenant_id=tenant_id, user_external_id="ann", records=preferences(start, n))
        job = Scheduler(database, queue=queue).train_now(tenant_id=tenant_id, user_external_id="ann").job
        assert worker.run_once() is not None and get_job(database, job.id).state == "succeeded"
        user_id = job.payload["users"][0]["user_id"]
        adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER)
        assert adapter is not None
        versions = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)
    first, second = (v.metrics for v in versions)
    # at the first step the policy is the slot as loaded; a loss of exactly log 2 means the reference is that
    # same model: the base (a fresh slot) for version 1, version 1's weights for version 2
    assert first["dpo_loss_first"] == pytest.approx(LN2, abs=1e-4)
    assert second["dpo_loss_first"] == pytest.approx(LN2, abs=1e-4)
    assert first["dpo_loss"] < LN2 and first["preference_pairs"] > 0
    assert second["preference_pairs"] > 0 and "holdout_preference_accuracy_after" in first | second
    assert versions[1].training_config["dpo_weight"] == 1.0
