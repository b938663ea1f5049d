"""QA scores each distinct (example, routes) row once: columns that route an example alike (the base's empty
routes in several columns, a bank of one member that its gate routes wholly to it) share the row's score."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.qa.evalsets import EvalSet
from lorafleet.qa.matrix import ColumnSpec, _distinct_rows, evaluate_matrix
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.results import ColumnInfo, Matrix
from lorafleet.training import metrics
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example


def test_columns_that_route_an_example_alike_share_its_row() -> None:
    examples = tuple(Example(i, f"question {i}?", f"answer {i}.", "sft") for i in range(3))
    own = EvalSet("own", "user-holdout", examples, total=3, own=True)
    columns = [ColumnSpec(ColumnInfo(name, "candidate")) for name in ("base", "candidate", "gated", "pair")]
    routes = {
        "base": [[], [], []],
        "candidate": [[(0, 1.0)], [(0, 1.0)], [(0, 1.0)]],
        "gated": [[(0, 1.0)], [(0, 0.75), (1, 0.25)], [(0, 1.0)]],  # the gate sends the second elsewhere
        "pair": [[(0, 0.5), (1, 0.5)]] * 3,
    }
    rows, where = _distinct_rows(own, columns, routes)
    assert len(rows) == 10  # 12 cells: the gated column's first and third examples are the candidate's rows
    assert len(where) == 12 and sorted(set(where)) == list(range(10))
    candidate, gated = where[3:6], where[6:9]
    assert gated[0] == candidate[0] and gated[2] == candidate[2] and gated[1] not in candidate
    cells = [(i, r) for c in routes.values() for i, r in enumerate(c)]
    # every cell reads the row of its own example and routes
    assert [(rows[j][0], list(rows[j][1])) for j in where] == cells


def test_the_probe_sets_base_rows_are_scored_once_per_process(
    tiny_parts: tuple[Backbone, AdapterBank], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second matrix over the same probe set reuses its base column's scores (and gets the same cells); the
    candidate's rows and another set's base rows are scored again."""
    backbone, bank = tiny_parts
    bank.init_slot(
        0, TrainingConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]).slot_config(), seed=3
    )
    probe = EvalSet(
        "probe", "probe", tuple(Example(i, f"Probe {i}?", f"Answer {i}.", "sft") for i in range(4)), 4
    )
    own = EvalSet("own", "user-holdout", (Example(9, "Mine?", "Yes.", "sft"),), 1, own=True)
    columns = [
        ColumnSpec(ColumnInfo("base", "base")),
        ColumnSpec(ColumnInfo("candidate", "candidate"), routes=(("candidate", 1.0),)),
    ]
    scored: list[int] = []
    real = metrics.score_examples

    def counting(*args: Any, **kwargs: Any) -> Any:
        scored.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "score_examples", counting)

    def run() -> Matrix:
        return evaluate_matrix(
            backbone=backbone,
            bank=bank,
            sets=[own, probe],
            columns=columns,
            slots={"candidate": 0},
            policy=QAPolicy(samples_per_cell=0, max_seq_len=64),
        )

    try:
        first, scored_first = run(), list(scored)
        scored.clear()
        second = run()
    finally:
        bank.evict_slot(0)
    assert scored_first[0] == 2 and scored[0] == 2  # the own set: base and candidate, both times
    # the probe: base and candidate the first time (no other test scores these texts), the candidate alone after
    assert scored_first[1] == 8 and scored[1] == 4
    for column in ("base", "candidate"):
        assert first.loss("probe", column) == second.loss("probe", column)
        # the body loss (what a preference candidate's probe is read on) is kept with the cached base scores too
        assert first.body_loss("probe", column) == second.body_loss("probe", column)
        assert math.isfinite(first.body_loss("probe", column))
        assert first.body_loss("probe", column) != first.loss("probe", column)
