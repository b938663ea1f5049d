"""Importing PEFT adapters as task-adapter versions: an adapter trained and saved by PEFT on the real tiny
backbone, imported from a folder or an archive into the real registry (SQLite/PostgreSQL, local/S3 blobs)."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select

from lorafleet.adapters import AdapterBank, SlotPlan, inject_bank, load_slot_from_dir
from lorafleet.adapters.serialization import FINGERPRINT_METADATA_KEY
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.errors import (
    AdapterFormatError,
    AdapterShapeError,
    BackboneMismatchError,
    LorafleetError,
    NonFiniteError,
    PayloadTooLargeError,
    UnsafeFormatError,
    ValidationError,
    WeightBoundsError,
)
from lorafleet.registry import Registry
from lorafleet.routing.embeddings import embed_prompts, fit_claim, routing_key
from lorafleet.store.blob import BlobStore, open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapter, SqlAdapterVersion, SqlJob, SqlTenant
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.training.general_prompts import general_exemplars
from lorafleet.workflows.adapter_import import (
    ImportedAdapter,
    ImportRequest,
    PreparedImport,
    import_peft_adapter,
    prepare_import,
    register_import,
    unpack_import_archive,
)

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPTS = ["summarize: the cat sat on the mat all day", "summarize: rain fell on the town"]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A LoRA adapter trained 3 steps by PEFT and saved with ``save_pretrained``, and PEFT's own logits."""
    torch.manual_seed(3)
    input_ids = torch.randint(3, 259, (4, 9), generator=torch.Generator().manual_seed(7))  # [batch, seq]
    base = load_backbone(tiny_dir, quantization="fp32", device="cpu").model
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("peft") / "summarize"
    model.save_pretrained(folder)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits  # [batch, seq, vocab]
    return SimpleNamespace(folder=folder, input_ids=input_ids, logits=logits, tiny_dir=tiny_dir)


@pytest.fixture(scope="module")
def fp32(tiny_dir: Path) -> tuple[Backbone, AdapterBank]:
    """One fp32 backbone with a bank for the module (every test leaves the bank empty)."""
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    return backbone, inject_bank(backbone, target_modules="all-linear", n_slots=2, max_rank=8)


@pytest.fixture
def bank(fp32: tuple[Backbone, AdapterBank]) -> Iterator[AdapterBank]:
    yield fp32[1]
    assert fp32[1].occupied() == {}, "the import must evict the slot it checked the adapter in"


def _new_tenant(database: Database) -> int:
    with database.session() as s:
        tenant = SqlTenant(name="acme")
        s.add(tenant)
        s.flush()
        return int(tenant.id)


@pytest.fixture
def tenant_id(database: Database) -> int:
    return _new_tenant(database)


@pytest.fixture
def registry(database: Database, blob_store: BlobStore) -> Registry:
    return Registry(database, blob_store)


@pytest.fixture
def local_registry(database: Database, tmp_path: Path) -> Registry:
    """Both databases, a local blob store: for tests about checks and lineage, not about blob transport."""
    return Registry(database, open_blob_store((tmp_path / "blobs").as_uri()))


def _import(
    registry: Registry, tenant_id: int, source: Path, fp32: tuple[Backbone, AdapterBank], **kw: Any
) -> ImportedAdapter:
    backbone, bank = fp32
    args: dict[str, Any] = {"task_name": "summarize", "example_prompts": PROMPTS, "actor": "alice@acme", **kw}
    request = ImportRequest(tenant_id=tenant_id, source=source, **args)
    return import_peft_adapter(registry, request, backbone=backbone, bank=bank)


def _counts(registry: Registry, database: Database) -> tuple[int, int, int]:
    """(adapter rows, version rows, blobs)."""
    with database.session() as s:
        adapters = s.scalar(select(func.count()).select_from(SqlAdapter)) or 0
        versions = s.scalar(select(func.count()).select_from(SqlAdapterVersion)) or 0
    return int(adapters), int(versions), len(list(registry.blobs.list()))


@dataclass(frozen=True)
class LocalImports:
    """What most import tests take together: the trained adapter, the module's backbone and bank, and a tenant
    of the local registry."""

    trained: SimpleNamespace
    fp32: tuple[Backbone, AdapterBank]
    registry: Registry
    database: Database
    tenant_id: int

    def run(self, source: Path, **kw: Any) -> ImportedAdapter:
        return _import(self.registry, self.tenant_id, source, self.fp32, **kw)

    def counts(self) -> tuple[int, int, int]:
        return _counts(self.registry, self.database)


@pytest.fixture
def local(
    trained: SimpleNamespace,
    fp32: tuple[Backbone, AdapterBank],
    bank: AdapterBank,
    local_registry: Registry,
    database: Database,
    tenant_id: int,
) -> LocalImports:
    """The import tests' usual fixtures in one (``bank``'s check that the import left it empty included)."""
    return LocalImports(trained, fp32, local_registry, database, tenant_id)


# --- building sources ---------------------------------------------------------------------------------------
def _tar(folder: Path, dest: Path, *, arcname: str = "summarize", mode: str = "w:gz") -> Path:
    with tarfile.open(dest, mode) as tar:
        tar.add(folder, arcname=arcname)
    return dest


def _zip(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)  # the files at the top of the archive
    return dest


def _tar_with(dest: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return dest


def _entry(name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _source(form: str, folder: Path, tmp: Path) -> Path:
    if form == "folder":
        return folder
    if form == "zip":
        return _zip(folder, tmp / "adapter.zip")
    if form == "tar":  # members "./adapter_config.json", ...: the files at the top, "./"-prefixed
        return _tar(folder, tmp / "adapter.tar", arcname=".", mode="w")
    return _tar(folder, tmp / "adapter.tgz")


def _variant(
    src: Path,
    dest: Path,
    *,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    config: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A copy of a PEFT folder with its tensors, config or safetensors metadata changed."""
    dest.mkdir(parents=True)
    weights = load_file(str(src / WEIGHTS))
    save_file(
        tensors(weights) if tensors else weights, str(dest / WEIGHTS), metadata=metadata or {"format": "pt"}
    )
    peft_config = json.loads((src / CONFIG).read_text())
    (dest / CONFIG).write_text(json.dumps({**peft_config, **(config or {})}))
    return dest


def _resized(weights: dict[str, torch.Tensor], *, rank: int | None = None, d_in: int | None = None):
    out = {}
    for key, t in weights.items():  # A: [r, d_in], B: [d_out, r]
        if ".lora_A." in key:
            out[key] = torch.randn(rank or t.shape[0], d_in or t.shape[1])
        else:
            out[key] = torch.randn(t.shape[0], rank or t.shape[1])
    return out


def _absurd(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """1e30 in one lora_A weight: finite in fp32, NaN once served."""
    first = sorted(k for k in weights if ".lora_A." in k)[0]
    weights[first] = weights[first].clone()
    weights[first][0, 0] = 1e30
    return weights


def _steep(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every factor value 20 (within the factor bound): the update 2 * 4 * 400 = 3200 is not."""
    return {k: torch.full_like(t, 20.0) for k, t in weights.items()}


def _poisoned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    first = next(iter(weights))
    weights[first] = weights[first].clone()
    weights[first][0, 0] = float("nan")
    return weights


# --- imports that succeed -----------------------------------------------------------------------------------
def _import_and_check(
    form: str,
    *,
    registry: Registry,
    database: Database,
    trained: SimpleNamespace,
    fp32: tuple[Backbone, AdapterBank],
    tenant_id: int,
    tmp_path: Path,
) -> None:
    """Import the trained adapter from a source of ``form`` (``_source``) and check what it made: rows, routing
    key, stored bytes, and the registered version's logits against PEFT's."""
    source = _source(form, trained.folder, tmp_path)
    imported = _import(registry, tenant_id, source, fp32)
    backbone, bank = fp32
    version, adapter = imported.version, imported.adapter
    assert adapter.owner_user_id is None and adapter.name == "summarize"
    assert adapter.target_config == {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": sorted(TARGETS)}
    assert (version.number, version.status, version.rank) == (1, "candidate", 4)
    assert version.base_fingerprint == backbone.fingerprint.digest and version.metrics == {}
    assert version.target_modules == tuple(sorted(TARGETS))
    config = version.training_config
    assert (config["source"], config["actor"], config["example_prompts"]) == ("peft-import", "alice@acme", 2)
    assert config["peft_config"] == json.loads((trained.folder / CONFIG).read_text())
    assert config["source_sha256"] == imported.source_sha256 and len(imported.source_sha256) == 64
    if source.is_file():
        assert imported.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert imported.parent_version_id is None
    assert registry.lineage(tenant_id=tenant_id, version_id=version.id).edges == ()

    with database.session() as s:
        stored_key, stored_claim = QARepository(dialect=database.dialect).routing(s, version_id=version.id)
    assert stored_key == pytest.approx(imported.routing_key, rel=1e-12, abs=1e-12)
    assert imported.routing_key == pytest.approx(routing_key(backbone, bank, PROMPTS), abs=1e-6)
    # the claim: the example prompts told from the shipped general prompts on this backbone
    general = general_exemplars(backbone, bank)
    assert stored_claim == pytest.approx(fit_claim(embed_prompts(backbone, bank, PROMPTS), general), abs=1e-6)

    folder = registry.fetch_version(version=version, dest_dir=tmp_path / "fetched")
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        assert f.metadata()[FINGERPRINT_METADATA_KEY] == backbone.fingerprint.digest
    original, stored = load_file(str(trained.folder / WEIGHTS)), load_file(str(folder / WEIGHTS))
    assert original.keys() == stored.keys() and all(torch.equal(original[k], stored[k]) for k in original)
    info = load_slot_from_dir(bank, bank.free_slot(), folder, require_fingerprint=True)
    try:
        with torch.no_grad(), bank.use(SlotPlan.single([info.slot] * 4)):
            ours = backbone.model(input_ids=trained.input_ids).logits
    finally:
        bank.evict_slot(info.slot)
    assert (ours - trained.logits).abs().max().item() <= TOL


@pytest.fixture
def import_and_check(
    trained: SimpleNamespace, fp32: tuple[Backbone, AdapterBank], bank: AdapterBank, tmp_path: Path
) -> Callable[..., None]:
    """``_import_and_check`` of the trained adapter on the module's backbone, in the test's tmp dir (its bank
    left empty)."""
    return functools.partial(_import_and_check, trained=trained, fp32=fp32, tmp_path=tmp_path)


@pytest.mark.parametrize("form", ["folder", "tar.gz", "zip", "tar"])
def test_each_source_form_imports_a_version_with_peft_logits(
    form: str, import_and_check: Callable[..., None], sqlite_database: Database, tmp_path: Path
) -> None:
    registry = Registry(sqlite_database, open_blob_store((tmp_path / "blobs").as_uri()))
    import_and_check(
        form, registry=registry, database=sqlite_database, tenant_id=_new_tenant(sqlite_database)
    )


def test_import_on_every_database_and_blob_store(
    import_and_check: Callable[..., None], registry: Registry, database: Database, tenant_id: int
) -> None:
    import_and_check("tar.gz", registry=registry, database=database, tenant_id=tenant_id)


def test_a_new_import_replaces_the_live_version_else_the_newest_in_lineage(
    local: LocalImports, tmp_path: Path
) -> None:
    first = local.run(local.trained.folder)
    second = local.run(_zip(local.trained.folder, tmp_path / "a.zip"))
    assert first.parent_version_id is None and second.adapter.id == first.adapter.id
    assert (second.version.number, second.parent_version_id) == (2, first.version.id)  # none live: newest
    local.registry.promote(tenant_id=local.tenant_id, adapter_id=first.adapter.id, number=1, actor="qa")
    third = local.run(_tar(local.trained.folder, tmp_path / "a.tgz"))
    assert third.parent_version_id == first.version.id  # the live version 1, not the newest (2)

    lineage = local.registry.lineage(tenant_id=local.tenant_id, version_id=first.version.id)
    assert {(e.child_version_id, e.parent_version_id, e.relation) for e in lineage.edges} == {
        (second.version.id, first.version.id, "imported"),
        (third.version.id, first.version.id, "imported"),
    }
    assert third.version.status == "candidate"
    live = local.registry.live_version(tenant_id=local.tenant_id, adapter_id=first.adapter.id)
    assert live is not None and live.id == first.version.id  # an import never moves live


def test_import_in_the_callers_transaction_rolls_back_with_it(local: LocalImports) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), local.database.transaction():
        local.run(local.trained.folder)
        raise Abort
    # the new task adapter row commits first, the version did not; its blob waits for the GC
    assert local.counts() == (1, 0, 1)


def test_prepare_writes_no_row_and_a_job_registers_its_import_once(
    local: LocalImports, tmp_path: Path
) -> None:
    backbone, bank = local.fp32

    def prepare(source: Path) -> PreparedImport:
        request = ImportRequest(
            tenant_id=local.tenant_id,
            task_name="summarize",
            source=source,
            example_prompts=PROMPTS,
            actor="job",
        )
        return prepare_import(
            local.registry, request, backbone=backbone, bank=bank, work_dir=tmp_path / "work"
        )

    prepared = prepare(_tar(local.trained.folder, tmp_path / "a.tgz"))
    assert local.counts() == (0, 0, 1)  # the checked adapter's blob, ahead of the rows
    with local.database.session() as s:
        job = SqlJob(tenant_id=local.tenant_id, kind="import", state="running", payload={})
        s.add(job)
        s.flush()
        job_id = int(job.id)
    with local.database.transaction():
        first = register_import(local.registry, prepared, job_id=job_id)
    again = register_import(local.registry, prepared, job_id=job_id)
    assert again.version == first.version and again.version.job_id == job_id
    assert local.counts() == (1, 1, 1)
    with pytest.raises(ValidationError, match="not empty"):
        prepare(local.trained.folder)


def test_nf4_backbone_import_matches_peft_on_the_same_nf4_base(
    trained: SimpleNamespace, sqlite_database: Database, tmp_path: Path
) -> None:
    local_registry = Registry(sqlite_database, open_blob_store((tmp_path / "blobs").as_uri()))
    tenant_id = _new_tenant(sqlite_database)
    nf4 = load_backbone(trained.tiny_dir, quantization="nf4", device="cpu")
    nf4_bank = inject_bank(nf4, target_modules="all-linear", n_slots=1, max_rank=8)
    imported = _import(local_registry, tenant_id, _tar(trained.folder, tmp_path / "a.tgz"), (nf4, nf4_bank))
    assert nf4_bank.occupied() == {} and imported.version.base_fingerprint == nf4.fingerprint.digest
    folder = local_registry.fetch_version(version=imported.version, dest_dir=tmp_path / "fetched")
    info = load_slot_from_dir(nf4_bank, 0, folder, require_fingerprint=True)
    with torch.no_grad(), nf4_bank.use(SlotPlan.single([info.slot] * 4)):
        ours = nf4.model(input_ids=trained.input_ids).logits
    peft_base = load_backbone(trained.tiny_dir, quantization="nf4", device="cpu").model
    peft_model = PeftModel.from_pretrained(peft_base, trained.folder).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=trained.input_ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# --- refusals: nothing written ----------------------------------------------------------------------------
def _pickle_folder(folder: Path, tmp: Path) -> Path:
    dest = Path(shutil.copytree(folder, tmp / "with-pickle"))
    (dest / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    return dest


def _pickle_archive(folder: Path, tmp: Path) -> Path:
    files = [(_entry(p.name), p.read_bytes()) for p in sorted(folder.iterdir())]
    return _tar_with(tmp / "a.tgz", [*files, (_entry("adapter_model.bin"), b"\x80\x04K\x01.")])


def _member_archive(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Callable[[Path, Path], Path]:
    def build(folder: Path, tmp: Path) -> Path:
        files = [(_entry(p.name), p.read_bytes()) for p in sorted(folder.iterdir())]
        return _tar_with(tmp / "a.tgz", [*files, (_entry(name, kind=kind, link=link), b"{}")])

    return build


def _zip_symlink(folder: Path, tmp: Path) -> Path:
    dest = _zip(folder, tmp / "a.zip")
    with zipfile.ZipFile(dest, "a") as zf:
        info = zipfile.ZipInfo("link.md")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return dest


def _gzip_bomb(folder: Path, tmp: Path) -> Path:
    return _tar_with(
        tmp / "bomb.tgz", [(_entry("README.md"), bytes(8 << 20))]
    )  # 8 MiB of zeros, ~8 KiB packed


def _many_members(folder: Path, tmp: Path) -> Path:
    return _tar_with(tmp / "many.tgz", [(_entry(f"note-{i}.txt"), b"x") for i in range(40)])


def _two_folders(folder: Path, tmp: Path) -> Path:
    with tarfile.open(tmp / "two.tgz", "w:gz") as tar:
        tar.add(folder, arcname="one")
        tar.add(folder, arcname="two")
    return tmp / "two.tgz"


def _no_config(folder: Path, tmp: Path) -> Path:
    (tmp / "weights-only").mkdir()
    shutil.copyfile(folder / WEIGHTS, tmp / "weights-only" / WEIGHTS)
    return tmp / "weights-only"


def _not_an_archive(folder: Path, tmp: Path) -> Path:
    (tmp / "adapter.tgz").write_text("this is not an archive\n" * 40)
    return tmp / "adapter.tgz"


def _variant_of(**kwargs: Any) -> Callable[[Path, Path], Path]:
    return lambda folder, tmp: _variant(folder, tmp / "variant", **kwargs)


REFUSALS: dict[str, tuple[Callable[[Path, Path], Path], dict[str, Any], type[LorafleetError], str]] = {
    "pickle file in the folder": (_pickle_folder, {}, UnsafeFormatError, "training_args.bin"),
    "pickle member in an archive": (_pickle_archive, {}, UnsafeFormatError, "adapter_model.bin"),
    "path traversal": (_member_archive("../escape.json"), {}, AdapterFormatError, "outside"),
    "absolute path": (_member_archive("/tmp/escape.json"), {}, AdapterFormatError, "absolute"),
    "symlink member": (
        _member_archive("README.md", tarfile.SYMTYPE, "/etc/passwd"),
        {},
        AdapterFormatError,
        "link",
    ),
    "duplicate member": (_member_archive(CONFIG), {}, AdapterFormatError, "twice"),
    "hard link member": (
        _member_archive("README.md", tarfile.LNKTYPE, CONFIG),
        {},
        AdapterFormatError,
        "link",
    ),
    "device member": (_member_archive("null", tarfile.CHRTYPE), {}, AdapterFormatError, "device"),
    "zip symlink": (_zip_symlink, {}, AdapterFormatError, "link"),
    "oversized archive": (
        lambda f, t: _tar(f, t / "a.tgz"),
        {"max_bytes": 4096},
        PayloadTooLargeError,
        "4096",
    ),
    "gzip bomb": (_gzip_bomb, {"max_bytes": 1 << 20}, PayloadTooLargeError, "bytes"),
    "too many members": (_many_members, {}, PayloadTooLargeError, "entries"),
    "two adapter folders": (_two_folders, {}, AdapterFormatError, "2 adapter folders"),
    "not an archive": (_not_an_archive, {}, AdapterFormatError, "not a .tar"),
    "no adapter_config.json": (_no_config, {}, AdapterFormatError, CONFIG),
    "wrong shapes": (_variant_of(tensors=lambda w: _resized(w, d_in=32)), {}, AdapterShapeError, "expected"),
    "rank above max": (
        _variant_of(tensors=lambda w: _resized(w, rank=16), config={"r": 16}),
        {},
        AdapterShapeError,
        "maximum rank 8",
    ),
    "NaN weights": (_variant_of(tensors=_poisoned), {}, NonFiniteError, "NaN"),
    "1e30 weights": (
        _variant_of(tensors=_absurd),
        {},
        WeightBoundsError,
        r"largest \|value\| above the bound 1000 in base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight: 1e\+30",
    ),
    "1e30 lora_alpha": (
        _variant_of(config={"lora_alpha": 1e30}),
        {},
        WeightBoundsError,
        r"lora_alpha=1e\+30 with r=4 gives scaling 2\.5e\+29, above the bound 10000",
    ),
    "huge update": (_variant_of(tensors=_steep), {}, WeightBoundsError, r"largest \|value\| of the update"),
    "fingerprint mismatch": (
        _variant_of(metadata={"format": "pt", FINGERPRINT_METADATA_KEY: "f" * 64}),
        {},
        BackboneMismatchError,
        "ffffffff",
    ),
    "use_dora": (_variant_of(config={"use_dora": True}), {}, AdapterFormatError, "use_dora"),
    "task name with a slash": (lambda f, t: f, {"task_name": "a/b"}, ValidationError, "/"),
    "no example prompts": (lambda f, t: f, {"example_prompts": []}, ValidationError, "1-256"),
    "blank example prompt": (lambda f, t: f, {"example_prompts": ["ok", "  "]}, ValidationError, r"\[1\]"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_import_writes_nothing(case: str, local: LocalImports, tmp_path: Path) -> None:
    build, kwargs, error, message = REFUSALS[case]
    source = build(local.trained.folder, tmp_path)
    before = local.counts()
    with pytest.raises(error, match=message):
        local.run(source, **kwargs)
    assert local.counts() == before == (0, 0, 0)


# --- unpacking --------------------------------------------------------------------------------------------
def test_unpack_finds_the_folder_and_removes_dest_on_refusal(
    trained: SimpleNamespace, tmp_path: Path
) -> None:
    folder = unpack_import_archive(
        _tar(trained.folder, tmp_path / "a.tgz"), tmp_path / "out", max_bytes=1 << 20
    )
    assert folder == tmp_path / "out" / "summarize" and (folder / CONFIG).is_file()
    top = unpack_import_archive(
        _zip(trained.folder, tmp_path / "a.zip"), tmp_path / "out2", max_bytes=1 << 20
    )
    assert top == tmp_path / "out2" and sorted(p.name for p in top.iterdir()) == sorted(
        p.name for p in trained.folder.iterdir()
    )
    bad = _member_archive("../escape.json")(trained.folder, tmp_path)
    with pytest.raises(AdapterFormatError):
        unpack_import_archive(bad, tmp_path / "out3", max_bytes=1 << 20)
    assert not (tmp_path / "out3").exists() and not (tmp_path / "escape.json").exists()
    with pytest.raises(ValidationError, match="already exists"):
        unpack_import_archive(bad, tmp_path / "out2", max_bytes=1 << 20)


def test_a_zip_written_by_writestr_unpacks(trained: SimpleNamespace, tmp_path: Path) -> None:
    """``ZipFile.writestr`` records permission bits only (mode 0o600, no file type): a regular file, not a
    "device, pipe or special file" (finding 8 of issue 18)."""
    archive = tmp_path / "writestr.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(trained.folder.iterdir()):
            zf.writestr(path.name, path.read_bytes())
    assert {stat.S_IFMT(i.external_attr >> 16) for i in zipfile.ZipFile(archive).infolist()} == {0}
    folder = unpack_import_archive(archive, tmp_path / "out", max_bytes=1 << 20)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in trained.folder.iterdir())


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_a_weights_member_that_is_not_safetensors_is_refused_by_its_header(
    kind: str, trained: SimpleNamespace, tmp_path: Path
) -> None:
    """A large zero-filled ``adapter_model.safetensors`` (64 MiB that packs to a few KiB) is refused from its
    first bytes, before its data is written, and the unpack folder is removed."""
    zeros = bytes(64 << 20)
    config = (trained.folder / CONFIG).read_bytes()
    if kind == "zip":
        archive = tmp_path / "zeros.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(CONFIG, config)
            zf.writestr(WEIGHTS, zeros)
    else:
        archive = _tar_with(tmp_path / "zeros.tgz", [(_entry(CONFIG), config), (_entry(WEIGHTS), zeros)])
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        unpack_import_archive(archive, tmp_path / "out", max_bytes=1 << 30)
    assert not (tmp_path / "out").exists()
