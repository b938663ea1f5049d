"""Sanity checks on a version's files before any evaluation: a version that fails one is rejected unevaluated.

Checks (each problem is one line starting ``sanity/<check>:``):

- ``format``: a valid PEFT folder holding LoRA A/B weights only (never pickle);
- ``fingerprint``: the version row and the weights' metadata both record this bank's backbone fingerprint;
- ``non-finite``: every weight is finite;
- ``rank``: the file's rank equals the version row's and the adapter's configured rank, and fits the bank;
- ``target-modules``: the adapted modules are the configured ones (a list of leaf names, ``all-linear`` or a
  regex) and every one is a layer of the bank;
- ``weights``: the LoRA scaling, A, B and the update ``scaling * B @ A`` lie within the policy's weight bounds
  (``QAPolicy.weight_bounds``, ``lorafleet.registry.weight_sanity``): finite but absurd weights (1e30, or a
  1e30 ``lora_alpha``) are named here, before anything is loaded into the bank or served;
- ``update-norm``: each module's update ``scaling * ||B @ A||_F`` lies within the policy's bounds (a huge
  update is a diverged or tampered adapter; a lower bound > 0 refuses adapters that never trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.domain import Adapter, AdapterVersion
from lorafleet.errors import AdapterFormatError
from lorafleet.qa.policy import QAPolicy
from lorafleet.registry.peft_format import AdapterFiles, inspect_adapter_dir
from lorafleet.registry.weight_sanity import weight_problems

if TYPE_CHECKING:
    import torch

    from lorafleet.adapters import AdapterBank


@dataclass(frozen=True)
class SanityResult:
    """The problems found (empty: passed) and each module's update norm."""

    problems: tuple[str, ...]
    update_norms: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        norms = [v for v in self.update_norms.values() if math.isfinite(v)]
        return {
            "passed": self.passed,
            "problems": list(self.problems),
            "max_update_norm": max(norms) if norms else None,
            "min_update_norm": min(norms) if norms else None,
            "modules": len(self.update_norms),
        }


def check_adapter(
    folder: Path, *, version: AdapterVersion, adapter: Adapter, bank: AdapterBank, policy: QAPolicy
) -> SanityResult:
    """Every check above on a fetched version folder; never raises for a bad adapter, it reports it."""
    problems = _fingerprint_row(version, bank)
    try:
        files = inspect_adapter_dir(folder)
        tensors = _load(files)
    except AdapterFormatError as exc:
        return SanityResult((*problems, f"sanity/format: {exc}"))
    # the weights' own problems first: absurd values are the reason to give, whatever else is wrong
    non_finite = _non_finite(tensors)
    problems = [*non_finite, *([] if non_finite else _weights(files, tensors, policy)), *problems]
    problems += _fingerprint_file(files, bank)
    problems += _rank(files, version=version, adapter=adapter, bank=bank)
    try:
        pairs = _pairs(tensors)
        norms = _update_norms(pairs, files)
    except AdapterFormatError as exc:
        return SanityResult((*problems, f"sanity/format: {exc}"))
    problems += _targets(sorted(pairs), adapter=adapter, bank=bank)
    if not any(p.startswith("sanity/non-finite") for p in problems):
        problems += _norm_bounds(norms, policy)
    return SanityResult(tuple(problems), norms)


def _load(files: AdapterFiles) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(files.weights_path), device="cpu"))
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise AdapterFormatError(f"weights cannot be read ({exc})") from exc


def _fingerprint_row(version: AdapterVersion, bank: AdapterBank) -> list[str]:
    if bank.fingerprint and version.base_fingerprint != bank.fingerprint:
        return [
            f"sanity/fingerprint: version {version.number} records backbone {version.base_fingerprint[:16]}..., "
            f"QA runs on {bank.fingerprint[:16]}..."
        ]
    return []


def _fingerprint_file(files: AdapterFiles, bank: AdapterBank) -> list[str]:
    from lorafleet.adapters.serialization import read_adapter_fingerprint  # torch, on first use

    recorded = read_adapter_fingerprint(files)
    if recorded is None:
        return ["sanity/fingerprint: the weights record no backbone fingerprint"]
    if bank.fingerprint and recorded != bank.fingerprint:
        return [f"sanity/fingerprint: the weights record backbone {recorded[:16]}..., not this bank's"]
    return []


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    import torch

    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        return [f"sanity/non-finite: {len(bad)} tensors hold NaN or infinity (first: {bad[0]})"]
    return []


def _weights(files: AdapterFiles, tensors: dict[str, torch.Tensor], policy: QAPolicy) -> list[str]:
    try:
        found = weight_problems(files.config, tensors, policy.weight_bounds())
    except AdapterFormatError as exc:
        return [f"sanity/format: {exc}"]
    return [f"sanity/weights: {problem}" for problem in found]


def _rank(files: AdapterFiles, *, version: AdapterVersion, adapter: Adapter, bank: AdapterBank) -> list[str]:
    configured = adapter.target_config.get("rank")
    problems = []
    if files.rank != version.rank:
        problems.append(f"sanity/rank: the file has rank {files.rank}, the version row {version.rank}")
    if configured is not None and files.rank != int(configured):
        problems.append(f"sanity/rank: rank {files.rank} is not the configured rank {configured}")
    if files.rank > bank.max_rank:
        problems.append(f"sanity/rank: rank {files.rank} is above the bank's maximum {bank.max_rank}")
    return problems


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    from lorafleet.adapters.bank import group_peft_tensors  # torch, on first use

    return group_peft_tensors(tensors)


def _targets(modules: list[str], *, adapter: Adapter, bank: AdapterBank) -> list[str]:
    from lorafleet.adapters.bank import module_matches  # torch, on first use

    problems = []
    outside = [m for m in modules if m not in bank.layers]
    if outside:
        problems.append(f"sanity/target-modules: {len(outside)} modules are not bank layers ({outside[0]})")
    configured = adapter.target_config.get("target_modules")
    if isinstance(configured, list):
        wanted = [str(t) for t in configured]
        stray = [m for m in modules if not module_matches(m, wanted)]
        unused = [t for t in wanted if not any(module_matches(m, [t]) for m in modules)]
        if stray or unused:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
            problems.append(f"sanity/target-modules: adapts {leaves}, configured {sorted(wanted)}")
    elif isinstance(configured, str) and configured != "all-linear":
        stray = [m for m in modules if not module_matches(m, configured)]
        if stray:
            problems.append(f"sanity/target-modules: {stray[0]} does not match {configured!r}")
    return problems


def _update_norms(pairs: dict[str, dict[str, torch.Tensor]], files: AdapterFiles) -> dict[str, float]:
    """``scaling * ||B @ A||_F`` per module (fp32)."""
    from lorafleet.adapters.serialization import slot_config_from_peft  # torch, on first use

    scaling = slot_config_from_peft(files.config).scaling
    norms = {}
    for module, pair in sorted(pairs.items()):
        a, b = pair["A"].float(), pair["B"].float()  # [r, d_in], [d_out, r]
        norms[module] = scaling * float((b @ a).norm()) if a.shape[0] == b.shape[1] else math.nan
    return norms


def _norm_bounds(norms: dict[str, float], policy: QAPolicy) -> list[str]:
    problems = []
    high = {m: v for m, v in norms.items() if not v <= policy.max_update_norm}
    low = {m: v for m, v in norms.items() if v < policy.min_update_norm}
    if high:
        worst = max(high, key=lambda m: high[m] if math.isfinite(high[m]) else math.inf)
        problems.append(
            f"sanity/update-norm: {len(high)} modules above {policy.max_update_norm:g} "
            f"({worst}: {high[worst]:.4g})"
        )
    if low:
        worst = min(low, key=lambda m: low[m])
        problems.append(
            f"sanity/update-norm: {len(low)} modules below {policy.min_update_norm:g} ({worst}: {low[worst]:.4g})"
        )
    return problems


__all__ = ["SanityResult", "check_adapter"]
