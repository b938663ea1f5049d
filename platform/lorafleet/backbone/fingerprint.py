"""A stable fingerprint of a backbone: architecture, config and a hash of the checkpoint's weights.

Adapters record the fingerprint of the backbone they were trained on, and loading one into a bank built on
another backbone is refused. The fingerprint is taken from the *checkpoint folder* (not from the loaded,
possibly quantised, model), so an adapter trained on the nf4 backbone also fits the bf16 one of the same
checkpoint, as in QLoRA.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.errors import UnsafeFormatError, ValidationError

if TYPE_CHECKING:
    from torch import nn

#: Config keys that change with the library version or the load options, not with the model itself.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "use_cache",
        "_commit_hash",
        "_attn_implementation_autoset",
        "output_attentions",
        "output_hidden_states",
    }
)
_CHUNK = 8 * 1024 * 1024
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# In-process memo of weight hashes keyed by (path, size, mtime_ns): hashing a large checkpoint takes seconds.
_WEIGHTS_MEMO: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class BackboneFingerprint:
    """Identity of a backbone checkpoint; ``digest`` is what adapters record and are compared by."""

    architecture: str
    config_sha256: str
    weights_sha256: str

    @property
    def digest(self) -> str:
        """One sha256 over the three parts (64 hex characters)."""
        joined = f"{self.architecture}\n{self.config_sha256}\n{self.weights_sha256}".encode()
        return hashlib.sha256(joined).hexdigest()

    def __str__(self) -> str:
        return f"{self.architecture}:{self.digest[:16]}"


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without keys that depend on the library version or load options."""
    return {k: v for k, v in sorted(config.items()) if k not in VOLATILE_CONFIG_KEYS}


def _config_parts(config: dict[str, Any]) -> tuple[str, str]:
    canonical = canonical_config(config)
    architectures = canonical.get("architectures") or [canonical.get("model_type", "unknown")]
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str).encode()
    return str(architectures[0]), hashlib.sha256(blob).hexdigest()


def _hash_file(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHTS_MEMO:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _WEIGHTS_MEMO[key] = digest.hexdigest()
    return _WEIGHTS_MEMO[key]


def fingerprint_directory(directory: str | Path) -> BackboneFingerprint:
    """Fingerprint a Hugging Face checkpoint folder (config.json + *.safetensors); pickle weights are refused."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValidationError(f"{directory} has no config.json: not a Hugging Face model folder")
    architecture, config_sha = _config_parts(json.loads(config_path.read_text(encoding="utf-8")))
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        if any(p.suffix in _PICKLE_WEIGHTS for p in directory.iterdir()):
            raise UnsafeFormatError(
                f"{directory} holds only pickle weights; lorafleet loads safetensors only"
            )
        raise ValidationError(f"{directory} holds no *.safetensors weights")
    weights = hashlib.sha256()
    for shard in shards:
        weights.update(f"{shard.name}:{_hash_file(shard)}\n".encode())
    return BackboneFingerprint(architecture, config_sha, weights.hexdigest())


def fingerprint_model(model: nn.Module) -> BackboneFingerprint:
    """Fingerprint an in-memory model (config + every tensor's bytes); for models that have no folder.

    A quantised model hashes its quantised bytes, so prefer :func:`fingerprint_directory` when a folder exists.
    """
    import torch

    config = getattr(model, "config", None)
    architecture, config_sha = _config_parts(config.to_dict() if config is not None else {})
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        weights.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        weights.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return BackboneFingerprint(architecture, config_sha, weights.hexdigest())
