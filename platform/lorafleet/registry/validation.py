"""What the registry checks before it writes: names, actors, version arguments, routing keys, JSON fields,
the weights file (safetensors, finite) and the target of a live-alias move."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafleet.domain import AdapterVersion, LineageRelation, VersionStatus
from lorafleet.domain.enums import values as enum_values
from lorafleet.errors import AdapterFormatError, InvalidStateError, NonFiniteError, ValidationError
from lorafleet.registry.peft_format import AdapterFiles, read_safetensors_header

MAX_ROUTING_KEY_LENGTH = 65536
#: Statuses a version may be registered with or set to directly; ``live`` only comes from ``promote``.
SETTABLE_STATUSES = frozenset({VersionStatus.CANDIDATE, VersionStatus.REJECTED, VersionStatus.ARCHIVED})
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")


def _check_name(name: str) -> None:
    if not name or len(name) > 128 or name != name.strip():
        raise ValidationError("adapter name must be 1-128 characters without surrounding spaces")


def _check_actor(actor: str) -> None:
    if not actor or len(actor) > 256:
        raise ValidationError("actor must be 1-256 characters")


def _check_version_args(
    *, base_fingerprint: str, parents: Sequence[tuple[int, LineageRelation]], status: str
) -> None:
    if not base_fingerprint or len(base_fingerprint) > 128:
        raise ValidationError("base_fingerprint must be 1-128 characters")
    if status not in SETTABLE_STATUSES:
        raise ValidationError(f"a new version cannot be {str(status)!r} (register, then promote)")
    relations = enum_values(LineageRelation)
    for _, relation in parents:
        if relation not in relations:
            raise ValidationError(f"lineage relation {str(relation)!r} is not one of {relations}")
    if len({parent for parent, _ in parents}) != len(parents):
        raise ValidationError("a parent version is listed twice")


def _check_routing_key(key: Sequence[float], *, what: str = "routing key") -> tuple[float, ...]:
    """A non-empty, finite, non-zero vector of at most ``MAX_ROUTING_KEY_LENGTH`` floats (a routing key, or a
    routing claim with ``what="routing claim"``)."""
    try:
        values = tuple(float(v) for v in key)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be a sequence of numbers: {exc}") from exc
    if not 0 < len(values) <= MAX_ROUTING_KEY_LENGTH:
        raise ValidationError(f"{what} must have 1-{MAX_ROUTING_KEY_LENGTH} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values) or not any(values):
        raise ValidationError(f"{what} must be finite and not all zero")
    return values


def _check_weights_file(path: Path, *, max_header_bytes: int) -> None:
    """A safetensors file (never pickle) with at least one tensor, all floating values finite."""
    import torch
    from safetensors.torch import load_file

    header = read_safetensors_header(path, max_header_bytes=max_header_bytes)
    if not [k for k in header if k != "__metadata__"]:
        raise AdapterFormatError(f"{path.name} holds no tensors")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise AdapterFormatError(f"{path.name}: cannot be read ({exc})") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"tensor {name!r} contains NaN or infinity")


#: the statuses whose versions are never served nor exported, and why
_UNUSABLE = {
    VersionStatus.CORRUPT: "(its blob failed verification)",
    VersionStatus.REVOKED: "(a record it was trained on was deleted)",
}


def check_usable(version: AdapterVersion, *, to: str, corrupt: str = "is corrupt") -> None:
    """InvalidStateError when ``version`` is corrupt or revoked: it cannot ``to`` (go live, be downloaded);
    ``corrupt`` words the corrupt case (``is marked corrupt`` for a download)."""
    why = _UNUSABLE.get(version.status)
    if why is not None:
        state = corrupt if version.status == VersionStatus.CORRUPT else "is revoked"
        raise InvalidStateError(f"version {version.number} {state} {why} and cannot {to}")


def _check_target(*, target: AdapterVersion, current: AdapterVersion | None) -> None:
    if target.status == VersionStatus.REJECTED:
        raise InvalidStateError(f"version {target.number} was rejected and cannot go live")
    check_usable(target, to="go live")
    if current is not None and current.id == target.id:
        raise InvalidStateError(f"version {target.number} is already live")


def _json_dict(what: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy (no NaN/inf, string keys), refused up front rather than failing in the database."""
    try:
        return dict(json.loads(json.dumps(dict(value), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be JSON (finite numbers, string keys): {exc}") from exc


def _target_modules(files: AdapterFiles) -> tuple[str, ...]:
    """The config's list, or for a regex ``target_modules`` the module names the tensors actually adapt."""
    configured = files.target_modules
    if isinstance(configured, list):
        return tuple(str(m) for m in configured)
    found = set()
    for key in files.tensor_index:
        for marker in _LORA_MARKERS:
            if marker in key:
                found.add(key.split(marker)[0].rsplit(".", 1)[-1])
    return tuple(sorted(found)) or (configured,)
