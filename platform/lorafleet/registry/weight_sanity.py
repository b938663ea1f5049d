"""Weight sanity: bounds on a LoRA adapter's scaling, its A and B factors and its effective update.

Finite is not enough. An adapter with weights of 1e30 is finite, passes the format checks, and produces NaN
as soon as it is served (a 4-bit backbone computes in bf16/fp16; the LoRA path's product ``x @ A.T`` alone
overflows fp16 at 65504). This module measures, for every adapted module (``A``: ``[r, d_in]``, ``B``:
``[d_out, r]``, ``scaling`` = ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA):

- ``scaling``: the config's factor on ``B @ A`` (names the field, ``lora_alpha``);
- ``|A|max``, ``|B|max``: the largest absolute value of each factor;
- ``|A|rms-row``, ``|B|rms-col``: ``||A||_F / sqrt(r)`` and ``||B||_F / sqrt(r)``, the factors' norm per rank
  component, so the bound means the same at rank 4 and at rank 64;
- ``|delta|max``: the largest absolute value of the effective update ``delta = scaling * B @ A`` that serving
  adds to the layer's weight (scaling and rank are in it, so a small B with a huge alpha is caught like a huge
  B);
- ``|delta| per r``: ``||delta||_F / sqrt(r)``, the update's norm per rank component. It lies within a factor
  ``sqrt(r)`` below the update's largest gain (its spectral norm), so it bounds how much the update amplifies
  an input without growing with the layer's width as ``||delta||_F`` does (QA's own ``max_update_norm`` rule
  bounds ``||delta||_F`` for the backbone QA runs on);

and refuses a module over any bound of :class:`WeightBounds`, naming the tensor (or the config field), the
value and the bound. Import checks it before anything is written (``lorafleet.workflows.adapter_import``), and
QA's sanity step before any evaluation (``lorafleet.qa.sanity``).

The default bounds were set by measurement (``docs/qa.md``, "Weight sanity", has the whole table and how it was
made): adapters trained with the project's trainer (``train_slots``) at the defaults of the time (rank 8, alpha
16, lr 2e-3, 30 steps; the top 6 layers on SmolLM2) on the built-in tiny backbone and on SmolLM2-135M (nf4), and
at the most aggressive settings ``TrainingConfig`` accepts (lr 1e-2; on tiny 400 steps at rank 1/alpha 32, 16/64
and 64/1024 on every layer; on SmolLM2 100 steps at rank 16/alpha 64 on the top 6 layers), measure per module at
most:

    ===============  ============  ===================  =============================
    figure           defaults      most aggressive      default bound
    ===============  ============  ===================  =============================
    scaling          2             32 (r=1, alpha 32)   1e4 (the trainer allows 1024)
    |A|max, |B|max   0.15, 0.033   0.70, 0.49           1e3
    |A|, |B| per r   0.80, 0.55    2.5, 2.5             1e4
    |delta|max       0.044         35 (r=64, a=1024)    1e3
    |delta| per r    1.2           68 (r=64, a=1024)    1e4
    ===============  ============  ===================  =============================

So an adapter trained at the defaults sits at least three orders of magnitude inside every bound, and the most
aggressive one the trainer can make is still inside them (by 28x and more). The bounds are as far below what
breaks the arithmetic: serving computes the LoRA path in fp32 and the backbone in bf16 (CUDA) or fp32 (CPU), both
with a range of 3e38, and an update first produces infinities (then NaN in the next RMSNorm, which squares its
input) when ``|delta| * d_in * |x|`` passes ~1e19, i.e. at ``|delta|max`` around 1e15 for these backbones.
(fp16, range 65504, is not a compute dtype here; an exported adapter near the bounds would not survive it.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.errors import AdapterFormatError, ValidationError, WeightBoundsError

if TYPE_CHECKING:
    import torch

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
#: the largest module count named in a refusal (the count of the rest follows)
_NAMED = 3


@dataclass(frozen=True)
class WeightBounds:
    """Upper bounds on an adapter's weights (see the module docstring for what each measures and why)."""

    max_scaling: float = 1e4
    max_abs_factor: float = 1e3
    max_factor_norm: float = 1e4
    max_abs_delta: float = 1e3
    max_delta_norm: float = 1e4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValidationError(
                    f"weight bounds: {name} must be a positive finite number, got {value!r}"
                )


@dataclass(frozen=True)
class ModuleWeights:
    """One adapted module's figures, computed in float64 (an absurd fp32 value is reported as the value it is,
    not as an overflowed infinity); ``delta_*`` are NaN when A and B do not fit together."""

    module: str
    rank: int
    scaling: float
    a_max: float
    b_max: float
    a_norm: float
    b_norm: float
    delta_max: float
    #: ``||scaling * B @ A||_F / sqrt(r)``
    delta_norm: float


def lora_scaling(config: Mapping[str, Any]) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), as PEFT computes it; a non-number is a format
    error naming the field."""
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"adapter_config.json: r and lora_alpha must be numbers ({exc})") from exc
    if rank <= 0:
        raise AdapterFormatError(f"adapter_config.json: r must be positive, got {rank}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def measure_weights(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[ModuleWeights]:
    """Every module's figures, from PEFT-keyed tensors (``...q_proj.lora_A.weight``) and its config."""
    import torch

    scaling = lora_scaling(config)
    out = []
    with torch.no_grad():
        for module, pair in sorted(_pairs(tensors).items()):
            if set(pair) != {"A", "B"}:  # the format checks refuse it; nothing to bound here
                continue
            a, b = pair["A"].double(), pair["B"].double()  # [r, d_in], [d_out, r]
            r = max(1, a.shape[0]) if a.ndim == 2 else 1
            delta_max = delta_norm = math.nan
            if a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1]:
                delta = (b @ a) * scaling
                delta_max, delta_norm = _amax(delta), float(delta.norm()) / math.sqrt(r)
            out.append(
                ModuleWeights(
                    module=module,
                    rank=r,
                    scaling=scaling,
                    a_max=_amax(a),
                    b_max=_amax(b),
                    a_norm=float(a.norm()) / math.sqrt(r),
                    b_norm=float(b.norm()) / math.sqrt(r),
                    delta_max=delta_max,
                    delta_norm=delta_norm,
                )
            )
    return out


def weight_problems(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], bounds: WeightBounds
) -> list[str]:
    """One line per bound exceeded, naming the field or tensor, its value and the bound; empty: within bounds.

    The scaling is checked first and alone: with a scaling over its bound every module's update is over too,
    and the field is the one thing to fix.
    """
    scaling = lora_scaling(config)
    if not math.isfinite(scaling) or abs(scaling) > bounds.max_scaling:
        alpha = config.get("lora_alpha", 8)
        return [
            f"adapter_config.json: lora_alpha={alpha!r} with r={config.get('r')!r} gives scaling {scaling:.4g}, "
            f"above the bound {bounds.max_scaling:g}"
        ]
    modules = measure_weights(config, tensors)
    checks: list[tuple[str, str, Callable[[ModuleWeights], float], float]] = [
        ("lora_A.weight", "largest |value|", lambda m: m.a_max, bounds.max_abs_factor),
        ("lora_B.weight", "largest |value|", lambda m: m.b_max, bounds.max_abs_factor),
        ("lora_A.weight", "norm per rank (||A||_F/sqrt(r))", lambda m: m.a_norm, bounds.max_factor_norm),
        ("lora_B.weight", "norm per rank (||B||_F/sqrt(r))", lambda m: m.b_norm, bounds.max_factor_norm),
        ("scaling*B@A", "largest |value| of the update", lambda m: m.delta_max, bounds.max_abs_delta),
        (
            "scaling*B@A",
            "update norm per rank (||scaling*B@A||_F/sqrt(r))",
            lambda m: m.delta_norm,
            bounds.max_delta_norm,
        ),
    ]
    problems = []
    for tensor, what, figure, bound in checks:
        # NaN: A and B do not fit together, which the shape checks refuse with their own message
        over = [(m.module, figure(m)) for m in modules if figure(m) > bound]
        if not over:
            continue
        over.sort(key=lambda item: -item[1] if math.isfinite(item[1]) else -math.inf)
        named = ", ".join(f"{module}.{tensor}: {value:.4g}" for module, value in over[:_NAMED])
        more = f" and {len(over) - _NAMED} more" if len(over) > _NAMED else ""
        problems.append(f"{what} above the bound {bound:g} in {named}{more}")
    return problems


def check_weight_bounds(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], bounds: WeightBounds
) -> None:
    """Raise :class:`WeightBoundsError` (a 422 through the API) naming every bound exceeded."""
    problems = weight_problems(config, tensors, bounds)
    if problems:
        raise WeightBoundsError("adapter weights out of bounds: " + "; ".join(problems))


def _pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": ..., "B": ...}}`` from PEFT keys; other keys are left to the format checks."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is not None:
            grouped.setdefault(match["module"], {})[match["ab"]] = tensor
    return grouped


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


__all__ = [
    "ModuleWeights",
    "WeightBounds",
    "check_weight_bounds",
    "lora_scaling",
    "measure_weights",
    "weight_problems",
]
