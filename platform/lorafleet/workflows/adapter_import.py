"""Importing an existing PEFT adapter (a folder or an archive) as a new version of a tenant's task adapter, or of
a user's own adapter (``owner_user_id``).

An import goes through every check a trained adapter gets, and all of them run before anything is written: the
archive is unpacked safely (no absolute paths, no ``..``, no links or devices, capped size and entry count),
pickle files are refused, the safetensors header and config are checked, the weights are loaded into a free
slot of the caller's bank (shapes, rank, finite values, unsupported PEFT options, target modules) and the slot
is evicted again, the weights are bounded (``lorafleet.registry.weight_sanity``: finite but absurd values, or an
absurd ``lora_alpha``, are refused with the tensor or field named), and the routing key is computed from example prompts. Only then is the task adapter row
created (when new) and the version registered, as a ``candidate``: QA decides whether it goes live.

Two phases, so that a job can do the slow part outside its short fenced transaction: ``prepare_import`` checks
and stages (and stores the blob once every check has passed), ``register_import`` writes the rows, optionally
in the caller's transaction. ``import_peft_adapter`` does both.

A foreign PEFT adapter records no lorafleet backbone fingerprint; it is accepted against the current backbone
once its shapes fit, and the stored copy gets the backbone's fingerprint written into its safetensors metadata
(tensors and ``adapter_config.json`` unchanged, bit for bit), so QA, training and serving, which require a
fingerprint, load it like any other version. An adapter that does record a fingerprint must record this one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.domain import Adapter, AdapterVersion, LineageRelation, VersionStatus
from lorafleet.errors import AdapterFormatError, BackboneMismatchError, PayloadTooLargeError, ValidationError
from lorafleet.registry import pack_adapter_archive
from lorafleet.registry.archive import DEFAULT_MAX_ARCHIVE_MEMBERS, unpack_import_archive
from lorafleet.registry.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFiles,
    inspect_adapter_dir,
    load_adapter_tensors,
    read_safetensors_header,
)
from lorafleet.registry.weight_sanity import WeightBounds, check_weight_bounds
from lorafleet.store.blob.base import sha256_file
from lorafleet.training.general_prompts import general_exemplars
from lorafleet.workflows.tasks import validate_task_name
from lorafleet.workflows.workdirs import owned_tempdir

if TYPE_CHECKING:
    from lorafleet.adapters.bank import AdapterBank
    from lorafleet.backbone import Backbone
    from lorafleet.registry import Registry

#: the default cap on an import's bytes: the archive itself, and everything it unpacks to
DEFAULT_MAX_IMPORT_BYTES = 1 << 30
MAX_EXAMPLE_PROMPTS = 256
MAX_PROMPT_CHARS = 16_384
#: an import's evidence: at most this many example prompts with expected outputs, outputs this long
MAX_IMPORT_EXAMPLES = 256
MAX_EXPECTED_CHARS = 4_096
#: ``training_config`` key under which an import's examples (``[{"prompt", "expected"}]``) are stored; QA uses
#: them as the version's holdout (``lorafleet.qa.evalsets.holdout_set``)
EVIDENCE_KEY = "evidence"
#: ``training_config["source"]`` of an imported version
IMPORT_SOURCE = "peft-import"
IMPORTED = LineageRelation.IMPORTED


@dataclass(frozen=True)
class ImportRequest:
    """What one import brings and where it goes: the PEFT folder or archive ``source``, to become the next
    version of the tenant's task ``task_name`` (or, with ``owner_user_id``, of that user's own adapter of that
    name), with the example prompts its routing key is computed from and its evidence ``examples``, imported by
    ``actor``.

    ``target_config``: the new adapter's, when it does not exist yet (default: read from the PEFT config). The
    limits: ``max_bytes`` (the archive's size and its unpacked size) and ``weight_bounds`` (default
    ``WeightBounds()``; services pass ``QAPolicy.weight_bounds()`` of their settings)."""

    tenant_id: int
    task_name: str
    source: Path
    example_prompts: Sequence[str]
    actor: str
    target_config: Mapping[str, Any] | None = None
    max_bytes: int = DEFAULT_MAX_IMPORT_BYTES
    weight_bounds: WeightBounds | None = None
    examples: Sequence[Mapping[str, Any]] = ()
    owner_user_id: int | None = None


@dataclass(frozen=True)
class PreparedImport:
    """An adapter that passed every check, staged under the caller's ``work_dir`` and ready to register."""

    tenant_id: int
    #: the task's name, or (with ``owner_user_id``) the name of the user's own adapter
    adapter_name: str
    #: the staged PEFT folder (the backbone fingerprint in its metadata); its blob is already stored
    folder: Path
    base_fingerprint: str
    #: sha256 of the archive file, or for a folder of its two PEFT files packed as the registry packs them
    source_sha256: str
    routing_key: tuple[float, ...]
    training_config: dict[str, Any]
    #: used only when the adapter does not exist yet
    target_config: dict[str, Any]
    #: the user whose own adapter ``adapter_name`` is; None: a task adapter
    owner_user_id: int | None = None
    #: the gate's probe for the base side: the example prompts told from the shipped general ones
    routing_claim: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ImportedAdapter:
    """The registered version, its task adapter, the sha256 of what was imported and the stored routing key."""

    adapter: Adapter
    version: AdapterVersion
    source_sha256: str
    routing_key: tuple[float, ...]
    #: the version the import replaces (lineage edge "imported"), None when the task had no version
    parent_version_id: int | None


def import_peft_adapter(
    registry: Registry, request: ImportRequest, *, backbone: Backbone, bank: AdapterBank
) -> ImportedAdapter:
    """Register a PEFT folder or archive (.tar, .tar.gz/.tgz, .zip) as a ``candidate`` version of a task adapter
    (or of a user's own adapter): ``prepare_import`` then ``register_import`` (see both), with a temporary work
    folder."""
    with owned_tempdir("lorafleet-import-") as tmp:
        prepared = prepare_import(
            registry, request, backbone=backbone, bank=bank, work_dir=Path(tmp) / "work"
        )
        return register_import(registry, prepared)


def prepare_import(
    registry: Registry, request: ImportRequest, *, backbone: Backbone, bank: AdapterBank, work_dir: Path
) -> PreparedImport:
    """Run every check of an import and stage the adapter under ``work_dir`` (new or empty; keep it until
    ``register_import`` returns). Writes no row; a refusal writes nothing at all. The request's ``task_name``
    names the task, or with ``owner_user_id`` the user's own adapter (the same rules for the name).

    ``bank`` (on ``backbone``) lends one free slot for the shape check, which is evicted again (the caller keeps
    other users of the bank out meanwhile). The request's ``max_bytes`` caps the archive and what it unpacks to
    (or the folder's two files); an archive holds at most ``DEFAULT_MAX_ARCHIVE_MEMBERS`` entries. Once every
    check has passed, the staged adapter's blob is stored (``Registry.put_adapter_blob``), so that a registration
    inside a short transaction (a job's fence) uploads nothing; if it is never registered, ``Registry.gc``
    removes it.
    Weights out of the request's ``weight_bounds`` are a ``WeightBoundsError`` naming the tensor or field. The
    request's ``examples``: the import's evidence (``check_import_examples``), stored in the version's training
    config for QA's holdout.
    """
    name = validate_task_name(request.task_name)
    prompts = check_example_prompts(request.example_prompts)
    evidence = check_import_examples(request.examples)
    _check_actor(request.actor)
    if request.max_bytes < 1:
        raise ValidationError("max_bytes must be >= 1")
    work_dir = Path(work_dir)
    if work_dir.exists() and any(work_dir.iterdir()):
        raise ValidationError(f"work_dir {work_dir} is not empty")
    fingerprint = _backbone_digest(backbone, bank)
    folder, source_sha256 = _materialise(
        Path(request.source), work_dir / "source", max_bytes=request.max_bytes
    )
    files = _stage(
        folder, work_dir / "staged", fingerprint=fingerprint, bounds=request.weight_bounds or WeightBounds()
    )
    _check_loads(bank, files.directory)
    from lorafleet.routing.embeddings import (
        routing_key_and_claim,  # torch: the API checks imports without a model
    )

    key, claim = routing_key_and_claim(backbone, bank, prompts, general=general_exemplars(backbone, bank))
    training_config = {
        "source": IMPORT_SOURCE,
        "source_sha256": source_sha256,
        "peft_config": files.config,
        "actor": request.actor,
        "example_prompts": len(prompts),
    }
    if evidence:
        training_config[EVIDENCE_KEY] = evidence
    target = _target_config(files.config) if request.target_config is None else dict(request.target_config)
    _check_json(training_config=training_config, target_config=target)
    registry.put_adapter_blob(adapter_dir=files.directory)
    return PreparedImport(
        request.tenant_id,
        name,
        files.directory,
        fingerprint,
        source_sha256,
        key,
        training_config,
        target,
        request.owner_user_id,
        claim,
    )


def register_import(
    registry: Registry, prepared: PreparedImport, *, job_id: int | None = None
) -> ImportedAdapter:
    """Register a prepared import as the adapter's next ``candidate`` version (QA decides promotion).

    The adapter row (the task's, or the owner user's) is created when absent (committed on its own, before the version). The new version's
    parent (relation "imported") is the task's live version, else its newest version, else none: lineage shows
    what the import replaces. Inside an open transaction (``Database.unit_of_work``) the version row is inserted
    in it and commits with it. With ``job_id`` a second registration for
    the same job returns the first version (a retried job).
    """
    adapter = registry.get_or_create_adapter(
        tenant_id=prepared.tenant_id,
        owner_user_id=prepared.owner_user_id,
        name=prepared.adapter_name,
        target_config=prepared.target_config,
    )
    tenant_id = prepared.tenant_id
    if job_id is not None:
        done = registry.find_version_by_job(tenant_id=tenant_id, adapter_id=adapter.id, job_id=job_id)
        if done is not None:
            return _imported(prepared, adapter, done, _recorded_parent(registry, tenant_id, done))
    parent = _replaced_version(registry, tenant_id=tenant_id, adapter_id=adapter.id)
    version = registry.register_version(
        tenant_id=tenant_id,
        adapter_id=adapter.id,
        adapter_dir=prepared.folder,
        base_fingerprint=prepared.base_fingerprint,
        parents=() if parent is None else ((parent.id, IMPORTED),),
        training_config=prepared.training_config,
        metrics={},
        job_id=job_id,
        status=VersionStatus.CANDIDATE,
        routing_key=prepared.routing_key,
        routing_claim=prepared.routing_claim,
    )
    return _imported(prepared, adapter, version, None if parent is None else parent.id)


def _imported(
    prepared: PreparedImport, adapter: Adapter, version: AdapterVersion, parent_id: int | None
) -> ImportedAdapter:
    return ImportedAdapter(adapter, version, prepared.source_sha256, prepared.routing_key, parent_id)


# --- checks before anything is written -------------------------------------------------------------------
def check_example_prompts(prompts: Sequence[str]) -> list[str]:
    """1-``MAX_EXAMPLE_PROMPTS`` non-blank strings of at most ``MAX_PROMPT_CHARS`` characters each."""
    if isinstance(prompts, str):
        raise ValidationError("example_prompts must be a list of prompts, not one string")
    items = list(prompts)
    if not 1 <= len(items) <= MAX_EXAMPLE_PROMPTS:
        raise ValidationError(f"example_prompts must hold 1-{MAX_EXAMPLE_PROMPTS} prompts, got {len(items)}")
    for i, prompt in enumerate(items):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValidationError(f"example_prompts[{i}] must be a non-blank string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PayloadTooLargeError(f"example_prompts[{i}] is longer than {MAX_PROMPT_CHARS} characters")
    return items


def check_import_examples(examples: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """An import's evidence: at most ``MAX_IMPORT_EXAMPLES`` objects ``{"prompt", "expected"}``, both non-blank
    strings (prompt at most ``MAX_PROMPT_CHARS``, expected output at most ``MAX_EXPECTED_CHARS`` characters)."""
    if isinstance(examples, (str, Mapping)):
        raise ValidationError("examples must be a list of {prompt, expected} objects")
    items = list(examples)
    if len(items) > MAX_IMPORT_EXAMPLES:
        raise ValidationError(f"examples: at most {MAX_IMPORT_EXAMPLES}, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or set(item) != {"prompt", "expected"}:
            raise ValidationError(f"examples[{i}] must be an object with exactly 'prompt' and 'expected'")
        prompt, expected = item["prompt"], item["expected"]
        for field, value, limit in (
            ("prompt", prompt, MAX_PROMPT_CHARS),
            ("expected", expected, MAX_EXPECTED_CHARS),
        ):
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"examples[{i}].{field} must be a non-blank string")
            if len(value) > limit:
                raise PayloadTooLargeError(f"examples[{i}].{field} is longer than {limit} characters")
        out.append({"prompt": prompt, "expected": expected})
    return out


def check_archive_weights(
    archive: bytes, *, weight_bounds: WeightBounds | None = None, max_bytes: int = DEFAULT_MAX_IMPORT_BYTES
) -> None:
    """The checks of an import that need no backbone, on an uploaded archive, before anything is stored: safe
    unpacking, no pickle, the config and safetensors header, finite weights, and the weight bounds.

    ``submit_import`` runs them so that an absurd adapter is refused at once (a 422 through the API) and leaves
    no blob and no job behind; the trainer's ``prepare_import`` runs them again with the backbone's own.
    """
    with tempfile.TemporaryDirectory(prefix="lorafleet-import-check-") as tmp:
        upload = Path(tmp) / "upload"
        upload.write_bytes(archive)
        folder = unpack_import_archive(upload, Path(tmp) / "unpacked", max_bytes=max_bytes)
        files = inspect_adapter_dir(folder)
        check_weight_bounds(files.config, load_adapter_tensors(files), weight_bounds or WeightBounds())


def _check_actor(actor: str) -> None:
    if not isinstance(actor, str) or not 1 <= len(actor) <= 256:
        raise ValidationError("actor must be 1-256 characters")


def _backbone_digest(backbone: Backbone, bank: AdapterBank) -> str:
    """The backbone's fingerprint digest, which the bank (when it records one) must share."""
    digest = backbone.fingerprint.digest
    if bank.fingerprint and bank.fingerprint != digest:
        raise BackboneMismatchError("the adapter bank was built on another backbone than the one given")
    return digest


def _materialise(source: Path, unpack_to: Path, *, max_bytes: int) -> tuple[Path, str]:
    """The PEFT folder to import (the folder itself, or unpacked from the archive) and the source's sha256."""
    if source.is_dir():
        files = inspect_adapter_dir(source)  # refuses pickle files before anything else is read
        size = files.config_path.stat().st_size + files.weights_path.stat().st_size
        if size > max_bytes:
            raise PayloadTooLargeError(f"adapter folder holds {size} bytes, more than the cap of {max_bytes}")
        with tempfile.TemporaryDirectory(prefix="lorafleet-import-sha-") as tmp:
            packed = pack_adapter_archive(files=files, dest=Path(tmp) / "source.tar")
            return source, sha256_file(packed)[0]
    if source.is_file():
        size = source.stat().st_size
        if size > max_bytes:
            raise PayloadTooLargeError(f"archive of {size} bytes is larger than the cap of {max_bytes}")
        return unpack_import_archive(source, unpack_to, max_bytes=max_bytes), sha256_file(source)[0]
    raise AdapterFormatError(f"{source} is neither an adapter folder nor an archive file")


def _stage(folder: Path, staging: Path, *, fingerprint: str, bounds: WeightBounds) -> AdapterFiles:
    """Copy the two PEFT files aside with the backbone fingerprint in the weights' metadata (tensors unchanged).

    A recorded fingerprint other than ``fingerprint`` is refused; values must be finite and within ``bounds``.
    """
    # torch (and safetensors' torch half): only the trainer stages an import; the API's checks need neither
    from safetensors.torch import save_file

    from lorafleet.adapters.serialization import FINGERPRINT_METADATA_KEY, read_adapter_fingerprint

    files = inspect_adapter_dir(folder)  # pickle files, config, truncated or inconsistent header
    recorded = read_adapter_fingerprint(files)
    if recorded and recorded != fingerprint:
        raise BackboneMismatchError(
            f"adapter records backbone {recorded[:16]}..., the current backbone is {fingerprint[:16]}..."
        )
    tensors = load_adapter_tensors(files)  # also refuses NaN / inf
    check_weight_bounds(files.config, tensors, bounds)
    staging.mkdir(parents=True)
    shutil.copyfile(files.config_path, staging / CONFIG_FILE)
    if recorded:
        shutil.copyfile(files.weights_path, staging / WEIGHTS_FILE)
    else:
        metadata = {**_string_metadata(files.weights_path), FINGERPRINT_METADATA_KEY: fingerprint}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata=metadata)
    return inspect_adapter_dir(staging)


def _string_metadata(weights: Path) -> dict[str, str]:
    """The safetensors ``__metadata__`` entries that are strings (the format allows nothing else)."""
    metadata = read_safetensors_header(weights).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        return {}
    return {str(k): v for k, v in metadata.items() if isinstance(v, str)}


def _check_loads(bank: AdapterBank, folder: Path) -> None:
    """Load the staged adapter into a free slot with the bank's own loader, then evict it again.

    The loader checks target modules, shapes, rank against the bank's maximum, finite values, unsupported
    PEFT options and the fingerprint before it writes the slot, so a refusal leaves the bank unchanged.
    """
    from lorafleet.adapters.serialization import load_slot_from_dir  # torch, as in _stage

    info = load_slot_from_dir(bank, bank.free_slot(), folder, require_fingerprint=True, name="peft-import")
    bank.evict_slot(info.slot)


def _check_json(**values: dict[str, Any]) -> None:
    """Refuse non-JSON values (a NaN in the PEFT config) here, before any row is created."""
    for what, value in values.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{what} cannot be recorded as JSON: {exc}") from exc


def _target_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A new task adapter's ``target_config`` in the keys the trainer uses, read from the PEFT config."""
    targets = config.get("target_modules")
    return {
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout", 0.0),
        "target_modules": sorted(map(str, targets)) if isinstance(targets, list) else targets,
    }


def _replaced_version(registry: Registry, *, tenant_id: int, adapter_id: int) -> AdapterVersion | None:
    """The version an import replaces: the live one, else the newest, else None."""
    live = registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
    if live is not None:
        return live
    versions = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)
    return versions[-1] if versions else None


def _recorded_parent(registry: Registry, tenant_id: int, version: AdapterVersion) -> int | None:
    """The parent an already registered import recorded (its "imported" edge), or None."""
    lineage = registry.lineage(tenant_id=tenant_id, version_id=version.id, depth=1)
    parents = [e.parent_version_id for e in lineage.edges if e.child_version_id == version.id]
    return parents[0] if parents else None


__all__ = [
    "DEFAULT_MAX_ARCHIVE_MEMBERS",
    "DEFAULT_MAX_IMPORT_BYTES",
    "ImportRequest",
    "ImportedAdapter",
    "PreparedImport",
    "EVIDENCE_KEY",
    "check_example_prompts",
    "check_import_examples",
    "check_archive_weights",
    "import_peft_adapter",
    "prepare_import",
    "register_import",
    "unpack_import_archive",
]
