"""Exporting a version as a PEFT folder archive that PEFT itself loads (``AutoPeftModelForCausalLM``).

The stored blob is the registry's deterministic ustar archive of the two PEFT files. An export fetches it
(sha256 and size verified), rewrites ``base_model_name_or_path`` in ``adapter_config.json`` to a name PEFT can
load (``peft_base_name``), adds ``lorafleet_export.json`` (the backbone lorafleet trained on, its fingerprint,
the stored blob's sha256), and packs the folder ``<adapter>-v<n>/`` as a deterministic ``.tar.gz``. The
weights file is copied bit for bit: its safetensors metadata keeps the backbone fingerprint, so the archive
imports back into lorafleet (``POST .../import``), and PEFT ignores the extra file.
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafleet.config import SMOLLM2_BACKBONE
from lorafleet.domain import AdapterVersion
from lorafleet.registry.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from lorafleet.registry.validation import check_usable
from lorafleet.registry.versions import Registry
from lorafleet.store.blob.base import sha256_file

#: the Hugging Face model the built-in SmolLM2 backbone's GGUF file was converted from
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: built-in backbones with a public Hugging Face original; any other ``builtin:`` name (``builtin:tiny``, random
#: weights that exist only inside lorafleet) stays as it is: a marker the user replaces with a local folder
PEFT_BASE_NAMES = {SMOLLM2_BACKBONE: SMOLLM2_HF_ID}
#: the file an exported folder carries next to the PEFT files (PEFT ignores it)
EXPORT_INFO_FILE = "lorafleet_export.json"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ExportedVersion:
    """A written export: the ``.tar.gz`` file, its own sha256, and the sha256 of the version's stored blob."""

    path: Path
    filename: str
    archive_sha256: str
    version_sha256: str


def peft_base_name(backbone: str) -> str:
    """The ``base_model_name_or_path`` an exported adapter names for lorafleet's ``backbone`` setting: the
    Hugging Face id for the built-in SmolLM2, the folder itself for a local folder, and ``builtin:tiny`` as it is
    (no public model holds its random weights: point it at a local save, see ``docs/data-rights.md``)."""
    return PEFT_BASE_NAMES.get(backbone, backbone)


def check_exportable(version: AdapterVersion) -> None:
    """A ``corrupt`` version's blob failed verification, a ``revoked`` one was trained on deleted records: neither
    is exported (``InvalidStateError``, a 409 like any other state that refuses the request; a revoked version's
    blob may still exist until the gc grace ends, but its data was taken back)."""
    check_usable(version, to="be downloaded", corrupt="is marked corrupt")


def export_filename(adapter_name: str, number: int) -> str:
    """``<adapter>-v<n>.tar.gz`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    return f"{_UNSAFE_NAME.sub('_', adapter_name) or 'adapter'}-v{int(number)}.tar.gz"


def export_version(
    registry: Registry, *, version: AdapterVersion, adapter_name: str, backbone: str, dest_dir: Path
) -> ExportedVersion:
    """Write the version's PEFT folder archive into ``dest_dir`` (see the module docstring); a corrupt version,
    or a blob that no longer matches its sha256, is refused before anything is written there."""
    check_exportable(version)
    filename = export_filename(adapter_name, version.number)
    folder_name = filename.removesuffix(".tar.gz")
    with tempfile.TemporaryDirectory(prefix=".lorafleet-export-", dir=dest_dir) as tmp:  # beside the result
        folder = registry.fetch_version(version=version, dest_dir=Path(tmp) / folder_name)
        config = read_adapter_config(folder / CONFIG_FILE)
        config["base_model_name_or_path"] = peft_base_name(backbone)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        info = {
            "backbone": backbone,
            "backbone_fingerprint": version.base_fingerprint,
            "adapter": adapter_name,
            "version": version.number,
            "version_sha256": version.sha256,
        }
        (folder / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        path = Path(dest_dir) / filename
        _pack_tar_gz(folder, path)
    return ExportedVersion(path, filename, sha256_file(path)[0], version.sha256)


def _pack_tar_gz(folder: Path, dest: Path) -> None:
    """``folder`` as ``<folder name>/<file>`` entries, sorted, mtime 0, owner 0: same content, same bytes."""
    with (
        dest.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name in sorted((CONFIG_FILE, WEIGHTS_FILE, EXPORT_INFO_FILE)):
            path = folder / name
            info = tarfile.TarInfo(f"{folder.name}/{name}")
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, f)


__all__ = [
    "EXPORT_INFO_FILE",
    "ExportedVersion",
    "SMOLLM2_HF_ID",
    "check_exportable",
    "export_filename",
    "export_version",
    "peft_base_name",
]
