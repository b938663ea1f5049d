"""What a bank slot holds: an adapter's hyper-parameters (``SlotConfig``) and where it is loaded (``SlotInfo``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorafleet.errors import AdapterShapeError, ValidationError


@dataclass(frozen=True)
class SlotConfig:
    """An adapter's LoRA hyper-parameters, as in PEFT's ``LoraConfig`` (r, lora_alpha, lora_dropout, use_rslora)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    #: leaf or full module names the adapter targets; None = every layer of the bank
    target_modules: tuple[str, ...] | None = None
    #: the decoder layers a fresh adapter gets weights on (PEFT's ``layers_to_transform``): ``"top N"`` or layer
    #: indices; None = every layer. Only :meth:`AdapterBank.init_slot` reads it: a loaded adapter's tensors say
    #: where its weights are.
    layers: str | tuple[int, ...] | None = None
    #: a caller's label (e.g. an adapter version id); not used for compute
    name: str | None = None
    #: sha256 of the adapter's weights file when it came from one (cache keys, rollback safety)
    content_hash: str | None = None
    #: the backbone fingerprint digest the adapter was trained on, when known
    backbone_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValidationError(f"rank must be a positive int, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValidationError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValidationError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha/r, or alpha/sqrt(r) with rsLoRA (as PEFT computes it)."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def check_fits(self, max_rank: int) -> None:
        """Raise ``AdapterShapeError`` when the rank is above the bank's maximum."""
        if self.rank > max_rank:
            raise AdapterShapeError(f"adapter rank {self.rank} is above the bank's maximum rank {max_rank}")


@dataclass(frozen=True)
class SlotInfo:
    """A loaded slot: its index, its config and the bank layers (module paths) it has weights on."""

    slot: int
    config: SlotConfig
    modules: tuple[str, ...]
