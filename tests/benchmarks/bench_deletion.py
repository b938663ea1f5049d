"""Forgetting one record on the real backbone (SmolLM2-135M-Instruct, nf4): time from the deletion to the rebuilt
version live, against one ordinary training job of the same records measured in the same run.

Protocol: one user, five rounds of ``--records`` synthetic records, one train job per round (in-process
``ContinualTrainer`` and ``JobWorker`` over SQLite and a local blob directory, promote rule ``always``), so the
user has five live-in-turn versions, each continued from the one before. Then one record that
version 5 was trained on (a new record of round 5) is forgotten (``workflows.deletion.forget_records``, what the
API's ``DELETE`` runs): version 5 is revoked, ``live`` goes back to version 4, the rebuild job is queued; the worker
runs it under ``--promote-rule`` (``always``, or ``qa``: its QA job too, which may reject it: then
``rebuilt_live_version`` is null and ``versions_after`` says so) until ``live`` is the rebuilt version.

The baseline is the job that trained version 5: the same parent (version 4) and the same records but the forgotten
one, so the ratio says what forgetting costs beyond retraining that round: the deletion's transaction, queueing,
and (under ``qa``) QA. Run from the repository root:

    nice -n 19 .venv/bin/python tests/benchmarks/bench_deletion.py [--device cuda] [--records 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402,F401  (puts the repository root on sys.path)
import torch  # noqa: E402

from lorafleet.adapters import inject_bank  # noqa: E402
from lorafleet.backbone import load_backbone  # noqa: E402
from lorafleet.domain.subject import Subject  # noqa: E402
from lorafleet.jobs import JobQueue, JobWorker, Scheduler  # noqa: E402
from lorafleet.registry import Registry  # noqa: E402
from lorafleet.store.blob import open_blob_store  # noqa: E402
from lorafleet.store.sql import migrate  # noqa: E402
from lorafleet.store.sql.database import Database  # noqa: E402
from lorafleet.store.sql.feedback import get_snapshot  # noqa: E402
from lorafleet.store.sql.tenants import TenantRepository  # noqa: E402
from lorafleet.training import synthetic  # noqa: E402
from lorafleet.training.config import TrainingConfig  # noqa: E402
from lorafleet.training.overrides import set_tenant_training  # noqa: E402
from lorafleet.training.resident import Resident  # noqa: E402
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer  # noqa: E402
from lorafleet.workflows.deletion import RecordSelection, forget_records  # noqa: E402
from lorafleet.workflows.feedback import ingest_feedback  # noqa: E402
from lorafleet.workflows.qa_runner import QARunner  # noqa: E402
from lorafleet.workflows.qa_triggers import QA_JOB_KIND  # noqa: E402

USER = "ada"
VERSIONS = 5


def main() -> None:
    args = _parser().parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    training = {
        "rank": 8,
        "alpha": 16.0,
        "target_modules": "all-linear",
        "layers": "top 6",
        "max_steps": args.steps,
        "batch_size": 4,
        "max_seq_len": 128,
        "anchor_ratio": 0.0,
        "replay_ratio": 0.5,
        "holdout_fraction": 0.2,
        "seed": 0,
    }
    with tempfile.TemporaryDirectory(prefix="bench-deletion-") as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        migrate.upgrade(url)
        db = Database(url)
        registry = Registry(db, open_blob_store((Path(tmp) / "blobs").as_uri()))
        tenant_id = TenantRepository(db).create_tenant(name="bench")[0].id
        set_tenant_training(db, tenant_id=tenant_id, overrides=training)
        backbone = load_backbone(
            args.backbone, quantization="nf4", device=device, data_dir=Path(args.data_dir).resolve()
        )
        config = TrainingConfig(**training)
        bank = inject_bank(backbone, target_modules=config.target_modules, n_slots=2, max_rank=config.rank)
        resident = Resident(db, registry, backbone, bank)
        queue = JobQueue(db)
        scheduler = Scheduler(db, queue=queue)

        def worker_for(rule: str) -> JobWorker:
            trainer = ContinualTrainer(resident, config=config, promote_rule=rule, work_dir=Path(tmp))
            handlers: dict[str, Any] = {"train": trainer.run_job}
            if rule == "qa":
                handlers[QA_JOB_KIND] = QARunner(resident).run_job
            return JobWorker(queue, worker_id="bench", handlers=handlers, lease_seconds=3600)

        worker = worker_for("always")  # the five versions go live whatever QA would say of them

        job_seconds = []
        for round_ in range(1, VERSIONS + 1):
            # the synthetic data has three rounds of topics: later rounds reuse them with other phrasings
            topics = (round_ - 1) % len(synthetic.ROUNDS) + 1
            records = synthetic.make_user_records(USER, round=topics, n_records=args.records, seed=round_)
            ingest_feedback(db, tenant_id=tenant_id, user_external_id=USER, records=records)
            scheduler.train_now(tenant_id=tenant_id, user_external_id=USER)
            start = time.perf_counter()
            done = worker.run_until_idle()
            job_seconds.append(time.perf_counter() - start)
            assert all(j.state == "succeeded" for j in done), [j.error for j in done]
        user = TenantRepository(db).get_user(tenant_id=tenant_id, external_id=USER)
        adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=user.id, name=PERSONAL_ADAPTER)
        assert adapter is not None
        versions = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)
        live = registry.live_version(tenant_id=tenant_id, adapter_id=adapter.id)
        assert len(versions) == VERSIONS and live is not None and live.number == VERSIONS, versions
        assert live.dataset_snapshot_id is not None
        forgotten = int(get_snapshot(db, snapshot_id=live.dataset_snapshot_id).details["new_max_id"])

        worker = worker_for(args.promote_rule)
        start = time.perf_counter()
        receipt = forget_records(
            db,
            registry,
            tenant_id=tenant_id,
            subject=Subject.user(USER),
            selection=RecordSelection.parse(ids=[forgotten]),
            actor="bench",
            scheduler=scheduler,
        )
        forgot = time.perf_counter()
        rebuilt = None
        while rebuilt is None:
            if worker.run_once() is None:
                break
            now_live = registry.live_version(tenant_id=tenant_id, adapter_id=adapter.id)
            if now_live is not None and now_live.number > VERSIONS:
                rebuilt = now_live
        total = time.perf_counter() - start
        result = {
            "backbone": args.backbone,
            "device": device,
            "promote_rule": args.promote_rule,
            "records_per_round": args.records,
            "steps": args.steps,
            "train_job_seconds": [round(s, 2) for s in job_seconds],
            "revoked": [v["number"] for v in receipt.revoked_versions],
            "rebuild_job_id": receipt.rebuild_job_id,
            "rebuilt_live_version": None if rebuilt is None else rebuilt.number,
            "versions_after": {
                v.number: str(v.status)
                for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)
            },
            "forget_seconds": round(forgot - start, 3),
            "delete_to_rebuilt_live_seconds": round(total, 2),
            "baseline_job_seconds": round(job_seconds[-1], 2),
            "ratio_to_baseline": round(total / job_seconds[-1], 3),
        }
        print(json.dumps(result, indent=2))
        db.dispose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="builtin:smollm2-135m")
    parser.add_argument("--data-dir", default=".lorafleet", help="holds the converted backbone")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--records", type=int, default=16, help="records per round")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per job")
    parser.add_argument("--promote-rule", default="always", choices=["always", "qa"])
    return parser


if __name__ == "__main__":
    main()
