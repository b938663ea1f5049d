"""Reading and validating an adapter folder in PEFT's layout, without a model.

PEFT's layout is ``adapter_config.json`` + ``adapter_model.safetensors``. This module checks the files
alone (no backbone needed): the registry uses it before anything is written, and the bank's loader
(``lorafleet.adapters.serialization``) uses it before touching a model. Pickle files are never opened.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import AdapterFormatError, NonFiniteError, UnsafeFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: Extensions of pickle-based checkpoints; their presence alone makes a folder unacceptable.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
#: A safetensors header is JSON describing tensors; adapters have a few hundred entries at most.
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CONFIG_BYTES = 256 * 1024
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class AdapterFiles:
    """A validated PEFT adapter folder: its config and the header of its weights file."""

    directory: Path
    config: dict[str, Any]
    #: tensor name -> {"dtype": str, "shape": list[int], "data_offsets": [start, end]}
    tensor_index: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def target_modules(self) -> list[str] | str:
        tm = self.config.get("target_modules") or []
        return tm if isinstance(tm, str) else sorted(tm)


def refuse_pickle_files(directory: Path) -> None:
    """Raise ``UnsafeFormatError`` if the folder holds any pickle-based checkpoint file."""
    for path in directory.rglob("*"):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeFormatError(
                f"refusing pickle-based file {path.name!r}: only safetensors adapters are accepted"
            )


def read_safetensors_header(
    path: Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> dict[str, Any]:
    """Parse and check a safetensors header (size cap, offsets inside the file) without loading tensors."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise AdapterFormatError(f"{path.name}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > max_header_bytes:
            raise AdapterFormatError(
                f"{path.name}: header of {header_len} bytes exceeds the cap of {max_header_bytes}"
            )
        if 8 + header_len > size:
            raise AdapterFormatError(f"{path.name}: truncated (header runs past the end of the file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"{path.name}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path.name}: header is not a JSON object")
    data_len = size - 8 - header_len
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        _check_tensor_entry(path.name, name, info, data_len)
    return header


def _check_tensor_entry(file_name: str, name: str, info: Any, data_len: int) -> None:
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{file_name}: malformed entry for tensor {name!r}") from exc
    if dtype not in _SAFETENSORS_DTYPE_BYTES:
        raise AdapterFormatError(f"{file_name}: tensor {name!r} has unsupported dtype {dtype!r}")
    expected = math.prod(int(d) for d in shape) * _SAFETENSORS_DTYPE_BYTES[dtype]
    if not (0 <= start <= end <= data_len) or end - start != expected:
        raise AdapterFormatError(f"{file_name}: tensor {name!r} is truncated or its offsets are inconsistent")


def read_adapter_config(path: Path, *, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterFormatError(f"missing {CONFIG_FILE} in {path.parent}")
    if path.stat().st_size > max_bytes:
        raise AdapterFormatError(f"{CONFIG_FILE} is larger than {max_bytes} bytes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported (only LORA)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterFormatError(f"{CONFIG_FILE}: 'r' must be a positive integer, got {r!r}")
    return config


def inspect_adapter_dir(
    directory: str | Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> AdapterFiles:
    """Validate a PEFT adapter folder's files (no pickle, config, header, offsets) without loading tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory} is not a directory")
    refuse_pickle_files(directory)
    config = read_adapter_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFormatError(f"missing {WEIGHTS_FILE} in {directory}")
    header = read_safetensors_header(weights, max_header_bytes=max_header_bytes)
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    if not index:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no tensors")
    return AdapterFiles(directory=directory, config=config, tensor_index=index)


def load_adapter_tensors(files: AdapterFiles) -> dict[str, Any]:
    """Load the tensors (torch, CPU) of a validated folder and check that every value is finite."""
    import torch  # heavy import kept local: registry validation of headers needs no torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(files.weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise AdapterFormatError(f"{WEIGHTS_FILE}: cannot be read ({exc})") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"tensor {name!r} contains NaN or infinity")
    _check_tensor_layers(files.config, tensors)
    return tensors


def _check_tensor_layers(config: dict[str, Any], tensors: dict[str, Any]) -> None:
    """With ``layers_to_transform``, every tensor must sit on one of those layers (PEFT would put it nowhere
    else); an adapter whose weights and config disagree is refused."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return
    allowed = {layers} if isinstance(layers, int) else set(layers)
    outside = sorted(name for name in tensors if layer_of(name) not in allowed)
    if outside:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: layers_to_transform={sorted(allowed)} but tensors sit elsewhere, e.g. {outside[0]!r}"
        )


#: PEFT's common layer containers (``layers_pattern``): ``model.layers.3.self_attn.q_proj`` is in layer 3
LAYER_PATTERN = re.compile(r"(?:^|\.)(layers|h|blocks|layer)\.(\d+)\.")


def layer_of(module_name: str) -> int | None:
    """The decoder layer a module path belongs to (``...layers.7.mlp.up_proj`` -> 7), or None."""
    match = LAYER_PATTERN.search(module_name)
    return int(match.group(2)) if match else None
