"""Training adapters from feedback: datasets, the multi-tenant batched trainer, replay sampling, a synthetic task.

Public API (names load on first use, so importing this package does not import torch):

- ``TrainingConfig``: a job's hyper-parameters (``config``)
- ``Example``, ``UserDataset``, ``build_dataset``, ``is_holdout``, ``reservoir_sample``, ``encode_examples``
  (``dataset``)
- ``SlotTraining``, ``SlotResult``, ``train_slots``, ``evaluate``, ``EvalResult`` (``trainer``)
- ``synthetic``: the multi-user personalisation task used by tests, benchmarks and the demo

Its room (docs/architecture.md): the ML layer, above adapters, routing and serving's decode loop, below QA:
how adapters learn, given datasets. Which users train, when, and how the results become versions is the
``train`` job handler, a workflow (``lorafleet.workflows.continual``).
"""

from __future__ import annotations

from lorafleet._exports import lazy_export

# The trainer needs torch, the config and dataset rules do not.
__getattr__, __dir__, __all__ = lazy_export(
    __name__,
    {
        "lorafleet.training.config": ("TrainingConfig",),
        "lorafleet.training.dataset": (
            "Example",
            "UserDataset",
            "EncodedBatch",
            "build_dataset",
            "is_holdout",
            "reservoir_sample",
            "encode_examples",
        ),
        "lorafleet.training.metrics": ("EvalResult", "evaluate"),
        "lorafleet.training.trainer": ("SlotTraining", "SlotResult", "train_slots"),
    },
)
