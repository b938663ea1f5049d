"""Through the HTTP API and the SDK: an import with finite but absurd weights (1e30 in a tensor, or a 1e30
``lora_alpha``) is refused at once with a typed 422 naming the tensor or field, and stores nothing; under the
promote rule ``qa`` a promote of a version QA has not passed is a 409 without ``force``, and a forced one is
recorded as such and shown in the version list."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from api_helpers import (
    ADMIN_KEY,
    SERVING_OPTIONS,
    ApiServer,
    Library,
    TenantHandle,
    count_rows,
    live_task_version,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from services.api.app import create_app

from lorafleet.config import Settings
from lorafleet.sdk import Client, errors
from lorafleet.store.sql.models import SqlAdapter, SqlJob

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _absurd_copy(
    folder: Path, dest: Path, *, weight: float | None = None, alpha: float | None = None
) -> Path:
    """A copy of a PEFT folder with 1e30-like values: ``weight`` at [0, 0] of its first lora_A tensor, or
    ``alpha`` as its ``lora_alpha`` (safetensors metadata kept)."""
    shutil.copytree(folder, dest)
    if weight is not None:
        with safe_open(str(dest / WEIGHTS), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(dest / WEIGHTS))
        first = sorted(k for k in tensors if ".lora_A." in k)[0]
        tensors[first][0, 0] = weight
        save_file(tensors, str(dest / WEIGHTS), metadata=metadata)
    if alpha is not None:
        config = json.loads((dest / CONFIG).read_text())
        (dest / CONFIG).write_text(json.dumps({**config, "lora_alpha": alpha}))
    return dest


def test_a_1e30_import_is_refused_with_a_typed_422_and_changes_nothing(
    tenant: TenantHandle,
    library: Library,
    adapter_folder: Callable[[int], Path],
    tmp_path: Path,
) -> None:
    client = tenant.client
    blobs_before = sorted(b.sha256 for b in library.registry.blobs.list())
    jobs_before = count_rows(library.db, SqlJob, SqlJob.tenant_id == tenant.id)

    huge = _absurd_copy(adapter_folder(3), tmp_path / "huge", weight=1e30)
    with pytest.raises(errors.WeightsOutOfBounds) as refused:
        client.import_task_adapter("tone", huge, ["Be polite: hello"])
    assert refused.value.status == 422 and refused.value.code == "weights_out_of_bounds"
    assert "largest |value| above the bound 1000" in refused.value.message
    assert "layers.0.self_attn.q_proj.lora_A.weight: 1e+30" in refused.value.message

    alpha = _absurd_copy(adapter_folder(3), tmp_path / "alpha", alpha=1e30)
    with pytest.raises(errors.WeightsOutOfBounds) as refused:
        client.import_task_adapter("tone", alpha, ["Be polite: hello"])
    assert refused.value.code == "weights_out_of_bounds"
    assert "lora_alpha=1e+30 with r=4 gives scaling 2.5e+29" in refused.value.message

    # nothing stored: no task row, no job, no blob (the sane adapter is still accepted)
    assert count_rows(library.db, SqlAdapter, SqlAdapter.tenant_id == tenant.id) == 0
    assert count_rows(library.db, SqlJob, SqlJob.tenant_id == tenant.id) == jobs_before
    assert sorted(b.sha256 for b in library.registry.blobs.list()) == blobs_before
    assert client.import_task_adapter("tone", adapter_folder(3), ["Be polite: hello"]).created


@pytest.fixture(scope="module")
def qa_api(make_api_settings: Callable[..., Settings]) -> Iterator[ApiServer]:
    """A server with the promote rule ``qa`` (no workers: QA jobs stay queued)."""
    server = ApiServer(create_app(make_api_settings(promote_rule="qa"), options=SERVING_OPTIONS)).start()
    yield server
    server.stop()


@pytest.fixture
def qa_client(qa_api: ApiServer) -> Iterator[tuple[int, Client]]:
    with Client(qa_api.url, ADMIN_KEY) as admin:
        created = admin.create_tenant(f"tenant-{uuid.uuid4().hex[:10]}")
    with Client(qa_api.url, created.api_key, max_retries=0) as client:
        yield created.id, client


def test_promote_before_qa_needs_force_and_is_recorded(
    qa_client: tuple[int, Client], library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    tenant_id, client = qa_client
    user = library.tenants.get_or_create_user(tenant_id=tenant_id, external_id="uma")
    adapter = library.registry.get_or_create_adapter(
        tenant_id=tenant_id, owner_user_id=user.id, name="personal", target_config={}
    )
    library.registry.register_version(
        tenant_id=tenant_id, adapter_id=adapter.id, adapter_dir=adapter_folder(5), base_fingerprint="tiny"
    )

    with pytest.raises(errors.QAUndecided) as refused:
        client.promote("uma", "personal", 1, reason="ship it")
    assert refused.value.status == 409 and refused.value.code == "qa_undecided"
    assert "no passing QA decision (QA has not decided it yet)" in refused.value.message
    assert "force=true" in refused.value.message
    (listed,) = client.list_versions("uma", "personal")
    assert (listed.status, listed.qa_state, listed.qa_decision, listed.forced_live) == (
        "candidate",
        "undecided",
        None,
        False,
    )
    assert client.alias_history("uma", "personal") == []
    assert [j.kind for j in client.list_jobs()] == []

    event = client.promote("uma", "personal", 1, reason="ship it", force=True)
    assert (event.forced, event.to_version, event.reason) == (True, 1, "ship it")
    assert event.actor.startswith("api:")
    (listed,) = client.list_versions("uma", "personal")
    assert (listed.status, listed.qa_state, listed.forced_live) == ("live", "undecided", True)
    assert client.get_version("uma", "personal", 1).forced_live
    assert [e.forced for e in client.alias_history("uma", "personal")] == [True]
    assert [(j.kind, j.state) for j in client.list_jobs()] == [("qa", "queued")]  # QA still decides

    # a task version: the same rule (rollbacks need no force)
    client.submit_task_feedback("legal", [{"kind": "sft", "prompt": "contract", "completion": "ok"}])
    assert live_task_version(library, tenant_id=tenant_id, task="legal", folder=adapter_folder(8)) == 1
    task = library.registry.find_adapter(tenant_id=tenant_id, owner_user_id=None, name="legal")
    assert task is not None
    library.registry.register_version(
        tenant_id=tenant_id, adapter_id=task.id, adapter_dir=adapter_folder(9), base_fingerprint="tiny"
    )
    with pytest.raises(errors.QAUndecided, match="version 2 of 'legal' has no passing QA decision"):
        client.promote_task("legal", 2)
    assert client.promote_task("legal", 2, force=True).forced
    assert [(v.number, v.status, v.forced_live) for v in client.list_task_versions("legal")] == [
        (1, "archived", False),
        (2, "live", True),
    ]
    assert client.rollback_task("legal", 1, reason="back").forced is False
