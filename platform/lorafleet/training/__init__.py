"""Training adapters from feedback: datasets, the multi-tenant batched trainer, replay sampling, a synthetic task.

Public API (names load on first use, so importing this package does not import torch):

- ``TrainingConfig``: a job's hyper-parameters (``config``)
- ``Example``, ``UserDataset``, ``build_dataset``, ``is_holdout``, ``reservoir_sample``, ``encode_examples``
  (``dataset``)
- ``SlotTask``, ``SlotResult``, ``train_slots``, ``evaluate``, ``EvalResult`` (``trainer``)
- ``synthetic``: the multi-user personalisation task used by tests, benchmarks and the demo

Its room (docs/architecture.md): the ML layer, above adapters, routing and serving's decode loop, below QA:
how adapters learn, given datasets. Which users train, when, and how the results become versions is the
``train`` job handler, a workflow (``lorafleet.workflows.continual``).
"""

from __future__ import annotations

from typing import Any

from lorafleet._exports import lazy_export

_EXPORTS = {
    "TrainingConfig": "lorafleet.training.config",
    "Example": "lorafleet.training.dataset",
    "UserDataset": "lorafleet.training.dataset",
    "EncodedBatch": "lorafleet.training.dataset",
    "build_dataset": "lorafleet.training.dataset",
    "is_holdout": "lorafleet.training.dataset",
    "reservoir_sample": "lorafleet.training.dataset",
    "encode_examples": "lorafleet.training.dataset",
    "EvalResult": "lorafleet.training.metrics",
    "evaluate": "lorafleet.training.metrics",
    "SlotTask": "lorafleet.training.trainer",
    "SlotResult": "lorafleet.training.trainer",
    "train_slots": "lorafleet.training.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: the trainer needs torch, the config and dataset rules do not."""
    return lazy_export(__name__, _EXPORTS, name)
