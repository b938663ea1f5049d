"""QA scores each distinct (example, routes) row once: columns that route an example alike (the base's empty
routes in several columns, a bank of one member that its gate routes wholly to it) share the row's score."""

from __future__ import annotations

from lorafleet.qa.evalsets import EvalSet
from lorafleet.qa.matrix import ColumnSpec, _distinct_rows
from lorafleet.qa.results import ColumnInfo
from lorafleet.training.dataset import Example


def test_columns_that_route_an_example_alike_share_its_row() -> None:
    examples = tuple(Example(i, f"question {i}?", f"answer {i}.", "sft") for i in range(3))
    own = EvalSet("own", "user", examples, total=3, own=True)
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
