"""Server paths never reach a tenant (finding 7 of issue 18): tenants see ids and reasons, the log sees paths.

A server on a local blob directory (the data dir's ``blobs``) answers a generation whose live version's blob is
gone, an import whose archive lacks its weights file (checked in a temp folder), and a job whose stored error
names a temp folder; no answer holds the data dir or the temp dir, and each still names what went wrong.
"""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import ADMIN_KEY, SERVING_OPTIONS, ApiServer, live_personal_version
from services.api.app import create_app

from lorafleet.config import Settings
from lorafleet.platform import Platform
from lorafleet.sdk.calls import adapter_archive
from lorafleet.store.blob.local import LocalBlobStore

PROBE_KIND = "faults-path-probe"


@pytest.fixture(scope="module")
def local_settings(
    make_api_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory, api_data_dir: Path
) -> Settings:
    blobs = api_data_dir / f"blobs-{uuid.uuid4().hex[:8]}"  # under the data dir, as by default
    return make_api_settings(object_store_url=blobs.as_uri())


@pytest.fixture(scope="module")
def local_api(local_settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(create_app(local_settings, options=SERVING_OPTIONS))
    server.start()
    yield server
    server.stop()


def _forbidden_paths(settings: Settings) -> list[str]:
    data_dir = settings.data_dir.resolve()
    return [str(data_dir), str(settings.data_dir), tempfile.gettempdir().rstrip("/") + "/"]


def _assert_no_paths(answer: httpx.Response, settings: Settings) -> None:
    for path in _forbidden_paths(settings):
        assert path not in answer.text, (path, answer.text)


def test_errors_name_ids_and_reasons_never_server_paths(
    local_api: ApiServer,
    local_settings: Settings,
    adapter_folder: Callable[[int], Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with httpx.Client(base_url=local_api.url, timeout=120) as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        created = http.post("/v1/tenants", json={"name": f"paths-{uuid.uuid4().hex[:8]}"}, headers=admin)
        tenant_id, key = created.json()["id"], created.json()["api_key"]
        mine = {"Authorization": f"Bearer {key}"}
        with Platform.from_settings(local_settings) as library, caplog.at_level(logging.WARNING):
            # a live version whose blob is gone from the blob directory
            live_personal_version(library, tenant_id=tenant_id, user="alice", folder=adapter_folder(1))
            version = library.registry.list_versions(
                tenant_id=tenant_id,
                adapter_id=library.registry.list_adapters(
                    tenant_id=tenant_id,
                    owner_user_id=library.tenants.get_user(tenant_id=tenant_id, external_id="alice").id,
                )[0].id,
            )[0]
            blobs = library.blobs
            assert isinstance(blobs, LocalBlobStore)
            blobs.path_for(version.sha256).unlink()
            answer = http.post(
                "/v1/users/alice/generate", json={"prompt": "Hi", "max_tokens": 1}, headers=mine
            )
            assert 400 <= answer.status_code < 600 and answer.status_code != 500, answer.text
            _assert_no_paths(answer, local_settings)
            assert version.sha256[:12] in answer.text  # the blob is named by its digest

            # an import whose archive has no weights file: refused at once, checked in a temp folder
            folder = tmp_path / "no-weights"
            folder.mkdir()
            shutil.copy(adapter_folder(1) / "adapter_config.json", folder)
            body = {
                "archive_base64": base64.b64encode(adapter_archive(folder)).decode("ascii"),
                "example_prompts": ["Hi"],
            }
            answer = http.post("/v1/tasks/summarise/import", json=body, headers=mine)
            assert answer.status_code == 422, answer.text
            _assert_no_paths(answer, local_settings)
            assert "adapter_model.safetensors" in answer.json()["error"]["message"]

            # a job whose failure (as a trainer records it) names its temp folder
            job = library.queue.submit(
                tenant_id=tenant_id, kind=PROBE_KIND, payload={}, dedupe_key=None, max_attempts=1
            ).job
            claimed = library.queue.claim(worker_id="faults", kinds=[PROBE_KIND], lease_seconds=60)
            assert claimed is not None and claimed.id == job.id
            where = Path(tempfile.gettempdir()) / f"lorafleet-import-{job.id}-x1y2" / "adapter"
            error = f"missing adapter_model.safetensors in {where}"
            library.queue.fail(job_id=job.id, worker_id="faults", error=error, attempt=claimed.attempts)
            for url in (f"/v1/jobs/{job.id}", "/v1/jobs"):
                answer = http.get(url, headers=mine)
                assert answer.status_code == 200, answer.text
                _assert_no_paths(answer, local_settings)
                assert "missing adapter_model.safetensors in <temp dir>" in answer.text
            assert library.queue.get(tenant_id=tenant_id, job_id=job.id).error == error  # kept for operators
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert str(local_settings.data_dir) in logged or str(local_settings.data_dir.resolve()) in logged
