"""Data rights, export (issue 19 item 4) through the SDK and the HTTP API: a version downloads as a PEFT folder
archive (user and task; 404 for none, 409 for a corrupt one), feedback exports as JSON Lines (every page, oldest
first), and a user's own adapter imports from PEFT like a task's."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from api_helpers import ApiServer, Library, LiveVersions, TenantHandle, sft
from services.api.routes import feedback as feedback_routes

from lorafleet.jobs.queue import JobQueue
from lorafleet.jobs.worker import JobWorker
from lorafleet.registry.export import EXPORT_INFO_FILE
from lorafleet.sdk import AsyncClient, errors
from lorafleet.sdk.schemas import DownloadedFile
from lorafleet.training.resident import Resident
from lorafleet.workflows.import_jobs import IMPORT_JOB_KIND, ImportRunner


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, mode="r:gz") as tar:
        out = {}
        for member in tar.getmembers():
            data = tar.extractfile(member)
            assert member.isreg() and data is not None
            out[member.name] = data.read()
        return out


def test_a_version_downloads_as_a_peft_folder_archive(
    api: ApiServer, tenant: TenantHandle, live: LiveVersions, tmp_path: Path
) -> None:
    client = tenant.client
    live.personal("ada", 1)
    folder = live.adapter_folder(1)
    stored = client.get_version("ada", "personal", 1)

    got = client.download_version("ada", "personal", 1, tmp_path / "out" / "v1.tar.gz")
    path = Path(got.path)
    assert path == tmp_path / "out" / "v1.tar.gz" and path.is_file()
    assert (
        got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and got.size_bytes == path.stat().st_size
    )
    assert got.version_sha256 == stored.sha256
    members = _members(path)
    assert sorted(members) == [
        "personal-v1/adapter_config.json",
        "personal-v1/adapter_model.safetensors",
        f"personal-v1/{EXPORT_INFO_FILE}",
    ]
    # the weights bit for bit (their metadata keeps the backbone fingerprint); the config names a base
    assert (
        members["personal-v1/adapter_model.safetensors"]
        == (folder / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads(members["personal-v1/adapter_config.json"])
    original = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny"  # the documented marker of the test backbone
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in original.items() if k != "base_model_name_or_path"
    }
    info = json.loads(members[f"personal-v1/{EXPORT_INFO_FILE}"])
    assert info["version_sha256"] == stored.sha256 and info["backbone"] == "builtin:tiny"

    # the same bytes every time, the headers say which digest is which, and the file has a name
    raw = httpx.get(
        f"{api.url}/v1/users/ada/adapters/personal/versions/1/download",
        headers={"Authorization": f"Bearer {tenant.api_key}"},
    )
    assert raw.status_code == 200 and raw.content == path.read_bytes()
    assert raw.headers["content-type"] == "application/gzip"
    assert raw.headers["content-disposition"] == 'attachment; filename="personal-v1.tar.gz"'
    assert raw.headers["x-lorafleet-version-sha256"] == stored.sha256
    assert raw.headers["x-lorafleet-archive-sha256"] == got.sha256


def test_a_missing_or_corrupt_version_is_refused_and_nothing_is_written(
    tenant: TenantHandle, library: Library, live: LiveVersions, tmp_path: Path
) -> None:
    client = tenant.client
    live.personal("ada", 1)
    live.personal("ada", 2)
    dest = tmp_path / "v.tar.gz"
    with pytest.raises(errors.NotFound):
        client.download_version("ada", "personal", 9, dest)
    with pytest.raises(errors.NotFound):
        client.download_version("ada", "other", 1, dest)
    with pytest.raises(errors.NotFound):
        client.download_version("nobody", "personal", 1, dest)
    with pytest.raises(errors.ValidationFailed):
        client.download_version("ada", "personal", 0, dest)

    user = library.tenants.get_user(tenant_id=tenant.id, external_id="ada")
    adapter = library.registry.find_adapter(tenant_id=tenant.id, owner_user_id=user.id, name="personal")
    assert adapter is not None
    v1 = library.registry.get_version(tenant_id=tenant.id, adapter_id=adapter.id, number=1)
    library.registry.mark_corrupt(tenant_id=tenant.id, adapter_id=adapter.id, version_id=v1.id)
    with pytest.raises(errors.InvalidState) as refused:
        client.download_version("ada", "personal", 1, dest)
    assert refused.value.status == 409 and "corrupt" in refused.value.message
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no file, no partial file
    assert client.download_version("ada", "personal", 2, dest).version_sha256 is not None


def test_a_task_version_downloads_like_a_users(
    tenant: TenantHandle, live: LiveVersions, tmp_path: Path
) -> None:
    client = tenant.client
    live.task("tone", 3)
    got = client.download_task_version("tone", 1, tmp_path / "tone.tar.gz")
    assert got.version_sha256 == client.get_task_version("tone", 1).sha256
    assert "tone-v1/adapter_model.safetensors" in _members(Path(got.path))
    with pytest.raises(errors.NotFound):
        client.download_task_version("tone", 2, tmp_path / "none.tar.gz")
    with pytest.raises(errors.NotFound):
        client.download_task_version("no-such-task", 1, tmp_path / "none.tar.gz")


def test_feedback_exports_as_json_lines_every_page_oldest_first(
    tenant: TenantHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedback_routes, "EXPORT_PAGE", 2)  # five records: three pages
    client = tenant.client
    client.submit_feedback("ada", [sft(f"q{i}", "é ✓", tag="t") for i in range(5)])
    client.submit_feedback("bob", [sft("not ada's")])
    got = client.export_feedback("ada", tmp_path / "ada.jsonl")
    lines = Path(got.path).read_text(encoding="utf-8").splitlines()
    listed = client.list_feedback("ada", limit=100)
    assert [json.loads(line) for line in lines] == [r.model_dump(mode="json") for r in listed]
    assert [json.loads(line)["payload"]["prompt"] for line in lines] == [f"q{i}" for i in range(5)]
    with pytest.raises(errors.NotFound):
        client.export_feedback("nobody", tmp_path / "nobody.jsonl")
    assert not (tmp_path / "nobody.jsonl").exists()


def test_task_feedback_exports_as_json_lines(tenant: TenantHandle, tmp_path: Path) -> None:
    client = tenant.client
    client.submit_task_feedback("sql", [sft("q1"), sft("q2")])
    got = client.export_task_feedback("sql", tmp_path / "sql.jsonl")
    records = [json.loads(line) for line in Path(got.path).read_text().splitlines()]
    assert records == [r.model_dump(mode="json") for r in client.list_task_feedback("sql")]
    with pytest.raises(errors.NotFound):
        client.export_task_feedback("no-such-task", tmp_path / "none.jsonl")


def _run_imports(library: Library, api_data_dir: Path, tenant_id: int) -> None:
    """Run the queued ``import`` jobs as a trainer would (the API's server has no workers)."""
    from lorafleet.adapters import inject_bank
    from lorafleet.backbone import load_backbone

    backbone = load_backbone("builtin:tiny", quantization="fp32", device="cpu", data_dir=api_data_dir)
    bank = inject_bank(backbone, target_modules=["q_proj", "v_proj"], n_slots=2, max_rank=8)
    runner = ImportRunner(Resident(library.db, library.registry, backbone, bank), promote_rule="never")
    worker = JobWorker(
        JobQueue(library.db), worker_id="import-test", handlers={IMPORT_JOB_KIND: runner.run_job}
    )
    while worker.run_once() is not None:
        pass
    assert not JobQueue(library.db).list_jobs(tenant_id=tenant_id, state="queued")


def test_a_version_exported_from_one_user_imports_as_anothers(
    tenant: TenantHandle, library: Library, live: LiveVersions, api_data_dir: Path, tmp_path: Path
) -> None:
    client = tenant.client
    live.personal("ada", 1)
    exported = client.download_version("ada", "personal", 1, tmp_path / "ada-v1.tar.gz")

    submitted = client.import_adapter("bea", "from-ada", exported.path, ["Hello"], reason="moved")
    assert submitted.created and submitted.job.kind == "import" and submitted.job.state == "queued"
    again = client.import_adapter("bea", "from-ada", exported.path, ["Hello"])
    assert again.job.id == submitted.job.id and not again.created  # one active job per archive and adapter
    _run_imports(library, api_data_dir, tenant.id)
    job = client.get_job(submitted.job.id)
    assert job.state == "succeeded", job.error
    assert job.result is not None and (job.result["user"], job.result["adapter"]) == ("bea", "from-ada")
    assert "task" not in job.result

    [adapter] = client.list_adapters("bea")
    assert (adapter.name, adapter.live_version) == ("from-ada", None)  # a candidate: QA (or a person) decides
    [version] = client.list_versions("bea", "from-ada")
    assert version.status == "candidate"
    lineage = client.lineage("bea", "from-ada", 1)
    assert lineage.root.version.training_config["source"] == "peft-import"
    # the weights came across bit for bit: bea's version downloads with ada's weights file
    back = client.download_version("bea", "from-ada", 1, tmp_path / "bea-v1.tar.gz")
    weights = _members(Path(back.path))["from-ada-v1/adapter_model.safetensors"]
    assert weights == _members(Path(exported.path))["personal-v1/adapter_model.safetensors"]
    assert [a.name for a in client.list_adapters("ada")] == ["personal"]  # ada's own adapters are untouched


def test_a_bad_user_import_is_refused_and_changes_nothing(
    api: ApiServer,
    tenant: TenantHandle,
    library: Library,
    adapter_folder: Callable[[int], Path],
) -> None:
    client = tenant.client
    with pytest.raises(errors.ValidationFailed):
        client.import_adapter("cleo", "mine", b"not an archive at all", ["Hello"])
    with pytest.raises(errors.ValidationFailed):
        client.import_adapter("cleo", "mine", _nan_archive(adapter_folder(1)), ["Hello"])
    with pytest.raises(errors.ValidationFailed):
        client.import_adapter("cleo", "mine", adapter_folder(1), [])
    bad = httpx.post(
        f"{api.url}/v1/users/cleo/adapters/mine/import",
        json={"archive_base64": "***", "example_prompts": ["Hello"]},
        headers={"Authorization": f"Bearer {tenant.api_key}"},
    )
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("archive_base64:")
    # nothing stored: no user, no adapter, no job
    with pytest.raises(errors.NotFound):
        client.list_adapters("cleo")
    assert JobQueue(library.db).list_jobs(tenant_id=tenant.id) == []


def _nan_archive(folder: Path) -> bytes:
    """``folder``'s adapter with one weight set to NaN, as an archive (refused before anything is stored)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    out = {"adapter_config.json": (folder / "adapter_config.json").read_bytes()}
    path = folder.parent / f"{folder.name}-nan.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    out["adapter_model.safetensors"] = path.read_bytes()
    assert torch.isnan(load_file(str(path))[name]).any()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, data in out.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_async_client_downloads_and_exports_through_the_same_calls(
    api: ApiServer, tenant: TenantHandle, live: LiveVersions, tmp_path: Path
) -> None:
    live.personal("ada", 1)
    tenant.client.submit_feedback("ada", [sft("q1"), sft("q2")])
    expected = tenant.client.download_version("ada", "personal", 1, tmp_path / "sync.tar.gz")

    async def run() -> tuple[DownloadedFile, DownloadedFile]:
        async with AsyncClient(api.url, tenant.api_key, max_retries=0) as client:
            version = await client.download_version("ada", "personal", 1, tmp_path / "async.tar.gz")
            with pytest.raises(errors.NotFound):
                await client.download_version("ada", "personal", 7, tmp_path / "none.tar.gz")
            return version, await client.export_feedback("ada", tmp_path / "async.jsonl")

    version, feedback = asyncio.run(run())
    assert (version.sha256, version.version_sha256) == (expected.sha256, expected.version_sha256)
    assert Path(version.path).read_bytes() == Path(expected.path).read_bytes()
    prompts = [json.loads(line)["payload"]["prompt"] for line in Path(feedback.path).read_text().splitlines()]
    assert prompts == ["q1", "q2"] and not (tmp_path / "none.tar.gz").exists()


def test_every_export_is_one_audit_event_and_a_refused_one_none(
    tenant: TenantHandle, live: LiveVersions, tmp_path: Path
) -> None:
    client = tenant.client
    live.personal("ada", 1)
    live.task("tone", 3)
    client.submit_feedback("ada", [sft("a private question", "a private answer")])
    client.submit_task_feedback("tone", [sft("a private task question")])
    before = {e.id for e in client.list_audit()}

    got = client.download_version("ada", "personal", 1, tmp_path / "v1.tar.gz")
    client.download_task_version("tone", 1, tmp_path / "tone.tar.gz")
    client.export_feedback("ada", tmp_path / "ada.jsonl")
    client.export_task_feedback("tone", tmp_path / "tone.jsonl")
    with pytest.raises(errors.NotFound):
        client.download_version("ada", "personal", 9, tmp_path / "none.tar.gz")
    with pytest.raises(errors.NotFound):
        client.export_feedback("nobody", tmp_path / "nobody.jsonl")

    events = [e for e in client.list_audit() if e.id not in before]
    assert [(e.action, e.target, e.actor) for e in events] == [
        ("export.version", "user:ada/personal@1", f"api:{tenant.name}"),
        ("export.version", "task:tone@1", f"api:{tenant.name}"),
        ("export.feedback", "user:ada", f"api:{tenant.name}"),
        ("export.feedback", "task:tone", f"api:{tenant.name}"),
    ]
    assert events[0].details["version_sha256"] == got.version_sha256
    assert events[0].details["archive_sha256"] == got.sha256
    assert "private" not in json.dumps([e.model_dump(mode="json") for e in events])  # ids and hashes only
