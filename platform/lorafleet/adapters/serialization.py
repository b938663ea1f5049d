"""Saving a bank slot as a PEFT adapter folder, and loading a PEFT folder into a slot.

The folder is PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names), so
it loads in ``PeftModel.from_pretrained``, vLLM or LoRAX. The backbone fingerprint is recorded in the
safetensors metadata (PEFT ignores it; it is readable from the header without loading tensors). Loading checks
files, config, fingerprint, shapes, rank and values before the bank is touched, so a refused adapter leaves the
model unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.adapters.bank import AdapterBank
from lorafleet.adapters.slots import SlotConfig, SlotInfo
from lorafleet.errors import AdapterFormatError, BackboneMismatchError, NotFoundError, ValidationError
from lorafleet.registry.peft_format import (
    CONFIG_FILE,
    LAYER_PATTERN,
    WEIGHTS_FILE,
    AdapterFiles,
    inspect_adapter_dir,
    load_adapter_tensors,
    read_safetensors_header,
)

#: safetensors metadata key holding the backbone fingerprint digest
FINGERPRINT_METADATA_KEY = "lorafleet.backbone_fingerprint"
#: LoraConfig options this bank cannot honour; an adapter using them is refused rather than silently altered
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_qalora": False,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
}


@dataclass(frozen=True)
class SavedAdapter:
    """A PEFT folder written from a slot, and the sha256 of its weights file."""

    directory: Path
    content_hash: str


def slot_config_from_peft(
    config: dict[str, Any], *, content_hash: str | None = None, backbone_fingerprint: str | None = None
) -> SlotConfig:
    """A ``SlotConfig`` from a PEFT ``adapter_config.json``; options the bank cannot honour are refused."""
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, None) and value != {} and value != []:
            raise AdapterFormatError(f"{CONFIG_FILE}: {key}={value!r} is not supported by the adapter bank")
    targets = config.get("target_modules")
    target_modules = (targets,) if isinstance(targets, str) else tuple(sorted(targets)) if targets else None
    _check_layers_to_transform(config)
    try:
        return SlotConfig(
            rank=int(config["r"]),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=target_modules,
            layers=_layers(config),
            content_hash=content_hash,
            backbone_fingerprint=backbone_fingerprint,
        )
    except (
        TypeError,
        ValueError,
        ValidationError,
    ) as exc:  # a bad r, alpha or dropout is a format error here
        raise AdapterFormatError(f"{CONFIG_FILE}: {exc}") from exc


def _check_layers_to_transform(config: dict[str, Any]) -> None:
    """PEFT's ``layers_to_transform`` (an int or a list of ints) is accepted: the tensors' module names say
    where the weights go (``peft_format.load_adapter_tensors`` checks that they agree with it)."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return
    values = [layers] if isinstance(layers, int) else layers
    if not isinstance(values, list) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values
    ):
        raise AdapterFormatError(f"{CONFIG_FILE}: layers_to_transform must be an int or a list of ints")


def _layers(config: dict[str, Any]) -> tuple[int, ...] | None:
    layers = config.get("layers_to_transform")
    if layers is None:
        return None
    return (layers,) if isinstance(layers, int) else tuple(sorted(layers))


def peft_config_dict(bank: AdapterBank, slot: int) -> dict[str, Any]:
    """The slot's ``adapter_config.json`` as PEFT writes it for a LoRA adapter.

    A slot on some layers only is written as PEFT writes one: leaf ``target_modules`` plus
    ``layers_to_transform`` and ``layers_pattern``, so PEFT (and vLLM) load it as such.
    """
    info = _info(bank, slot)
    config = info.config
    targets, layers, pattern = _target_modules(bank, info)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": bank.base_model_name,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": targets,
        "fan_in_fan_out": any(bank.layers[m].kind.fan_in_fan_out for m in info.modules),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": layers,
        "layers_pattern": pattern,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_slot(bank: AdapterBank, slot: int, directory: str | Path) -> SavedAdapter:
    """Write the slot as a PEFT folder (files replaced atomically) and record the content hash on the slot."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.contiguous() for k, v in bank.slot_state_dict(slot).items()}
    metadata = {"format": "pt"}
    if bank.fingerprint:
        metadata[FINGERPRINT_METADATA_KEY] = bank.fingerprint
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata=metadata)
        (staging / CONFIG_FILE).write_text(
            json.dumps(peft_config_dict(bank, slot), indent=2), encoding="utf-8"
        )
        content_hash = _sha256(staging / WEIGHTS_FILE)
        directory.mkdir(exist_ok=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = _info(bank, slot)
    bank.set_slot_config(slot, dataclasses.replace(info.config, content_hash=content_hash))
    return SavedAdapter(directory, content_hash)


def read_adapter_fingerprint(files: AdapterFiles) -> str | None:
    """The backbone fingerprint recorded in the weights' safetensors metadata, if any."""
    metadata = read_safetensors_header(files.weights_path).get("__metadata__") or {}
    value = metadata.get(FINGERPRINT_METADATA_KEY) if isinstance(metadata, dict) else None
    return str(value) if value else None


def load_slot_from_dir(
    bank: AdapterBank,
    slot: int,
    directory: str | Path,
    *,
    replace: bool = False,
    require_fingerprint: bool = False,
    name: str | None = None,
) -> SlotInfo:
    """Load a PEFT adapter folder into a slot; typed errors (format, pickle, shape, rank, NaN, backbone)."""
    files = inspect_adapter_dir(directory)  # pickle files, config, truncated or inconsistent header
    fingerprint = read_adapter_fingerprint(files)
    if require_fingerprint and not fingerprint:
        raise BackboneMismatchError(f"{directory}: the adapter records no backbone fingerprint")
    config = slot_config_from_peft(files.config, backbone_fingerprint=fingerprint)
    config.check_fits(bank.max_rank)
    bank.check_fingerprint(fingerprint)
    tensors = load_adapter_tensors(files)  # also refuses NaN / inf
    config = dataclasses.replace(config, content_hash=_sha256(files.weights_path), name=name)
    return bank.load_slot(slot, tensors, config, replace=replace)


def _info(bank: AdapterBank, slot: int) -> SlotInfo:
    info = bank.slot_info(slot)
    if info is None:
        raise NotFoundError(f"slot {slot} is empty")
    return info


def _target_modules(
    bank: AdapterBank, info: SlotInfo
) -> tuple[list[str] | str, list[int] | None, str | None]:
    """``(target_modules, layers_to_transform, layers_pattern)`` in PEFT's usual form: leaf names (on the
    slot's layers when it has weights on some layers only), else a regex of the exact module names."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in info.modules})
    picked = {
        n for n, _ in bank.model.named_modules() if n and any(n == x or n.endswith(f".{x}") for x in leaves)
    }
    if picked == set(info.modules):
        return leaves, None, None
    by_layer = {n: LAYER_PATTERN.search(n) for n in picked}
    layers = sorted({int(m.group(2)) for n, m in by_layer.items() if m and n in info.modules})
    on_layers = {n for n, m in by_layer.items() if m and int(m.group(2)) in layers}
    if layers and on_layers == set(info.modules):
        words = {m.group(1) for m in by_layer.values() if m}
        return leaves, layers, words.pop() if len(words) == 1 else None
    return "^(" + "|".join(m.replace(".", r"\.") for m in info.modules) + ")$", None, None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
