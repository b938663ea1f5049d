"""``Resident``: the platform's stores and the model loaded in one process, which job handlers run on.

A trainer actor (``lorafleet.runtime.ray_runtime.TrainerHost``) loads its backbone and injects its adapter bank
once; its ``train``, ``qa`` and ``import`` handlers (``workflows.continual.ContinualTrainer``,
``workflows.qa_runner.QARunner`` with its ``qa.evaluation.Evaluator``, ``workflows.import_jobs.ImportRunner``)
all take the same ``Resident``: that model, with the database and registry they read and write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.training.dataset import pad_token_id

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank
    from lorafleet.adapters.prefix import FrozenPrefix
    from lorafleet.backbone import Backbone
    from lorafleet.registry import Registry
    from lorafleet.store.sql.database import Database


@dataclass(frozen=True)
class Resident:
    """The database and registry, and the resident backbone with the adapter bank injected into it (the bank's
    slots are lent to one job at a time: a handler evicts what it loaded before the next job runs)."""

    db: Database
    registry: Registry
    backbone: Backbone
    bank: AdapterBank

    def frozen_prefix(self, *, spill_dir: Path | None = None) -> FrozenPrefix | None:
        """A new frozen-prefix cache of the bank's model (None when the model does not split); ``spill_dir``:
        where states over its memory budget go."""
        from lorafleet.adapters.prefix import FrozenPrefix, backbone_identity  # torch

        return FrozenPrefix.for_bank(
            self.bank,
            identity=backbone_identity(self.backbone),
            pad_id=pad_token_id(self.backbone.tokenizer),
            spill_dir=spill_dir,
        )


__all__ = ["Resident"]
