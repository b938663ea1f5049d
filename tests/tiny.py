"""The tests' tiny set-up: a data dir with the built-in random-init tiny backbone, and a training config that
takes seconds on two CPU cores."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: a few steps on two projections: enough to move the holdout loss, fast on two CPU cores
TINY_TRAINING: dict[str, Any] = {
    # the random-init tiny model's "answers" to general prompts are noise: no anchor rows on it
    "anchor_ratio": 0.0,
    "rank": 4,
    "alpha": 8.0,
    "target_modules": ["q_proj", "v_proj"],
    "learning_rate": 5e-3,
    "max_steps": 8,
    "batch_size": 4,
    "max_seq_len": 64,
    "holdout_fraction": 0.3,
    "replay_ratio": 0.5,
    "seed": 0,
}


def tiny_backbone_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    """A new data dir ``name`` with the built-in tiny backbone built into it (processes load it from there)."""
    # imported here: it loads torch, which modules importing only TINY_TRAINING (api_helpers) do not load
    from lorafleet.backbone import build_tiny_backbone

    path = factory.mktemp(name)
    build_tiny_backbone(path)
    return path


def seeded_folders(root: Path, write: Callable[[Path, int], Path]) -> Callable[[int], Path]:
    """``get(seed)``: the folder ``write(root / f"seed-{seed}", seed)`` makes, written once per seed."""

    @functools.cache
    def get(seed: int) -> Path:
        return write(root / f"seed-{seed}", seed)

    return get
