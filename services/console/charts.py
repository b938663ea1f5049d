"""Geometry of the console's pictures, as plain data the templates draw as inline SVG: the lineage graph, the
training-loss curves and the colours of the QA heatmap. No I/O, no HTML here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: the lineage graph's lanes (dataset snapshots above the versions, jobs below) and node sizes, in SVG units
LANE_Y = {"snapshot": 20, "version": 110, "job": 200}
NODE_W, NODE_H, STEP_X, MARGIN_X = 120, 44, 150, 10


@dataclass(frozen=True)
class LineageVersion:
    """A version as the graph draws it (any adapter's: an import's source may be a task's version)."""

    id: int
    label: str
    status: str
    qa_state: str
    own: bool


@dataclass(frozen=True)
class GraphNode:
    key: str
    kind: str  # version | snapshot | job
    x: int
    y: int
    label: str
    detail: str
    css: str


@dataclass(frozen=True)
class GraphEdge:
    x1: int
    y1: int
    x2: int
    y2: int
    kind: str  # continued-from | imported | data | job


@dataclass(frozen=True)
class Graph:
    width: int
    height: int
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]


def lineage_graph(
    versions: Sequence[LineageVersion],
    *,
    edges: Sequence[tuple[int, int, str]],
    snapshots: Mapping[int, tuple[int, int]],
    jobs: Mapping[int, tuple[int, str]],
) -> Graph:
    """Versions left to right (by id: oldest first), each with its dataset snapshot above and its job below.

    ``edges``: ``(child_id, parent_id, relation)``; ``snapshots``: version id -> (snapshot id, record count);
    ``jobs``: version id -> (job id, state)."""
    ordered = sorted(versions, key=lambda v: v.id)
    x_of = {v.id: MARGIN_X + i * STEP_X for i, v in enumerate(ordered)}
    nodes: list[GraphNode] = []
    lines: list[GraphEdge] = []
    vy = LANE_Y["version"]
    for v in ordered:
        x = x_of[v.id]
        css = f"node-version status-{v.status} qa-{v.qa_state}" + ("" if v.own else " foreign")
        nodes.append(
            GraphNode(f"version-{v.id}", "version", x, vy, v.label, f"{v.status}, QA {v.qa_state}", css)
        )
        if v.id in snapshots:
            snap_id, count = snapshots[v.id]
            sy = LANE_Y["snapshot"]
            nodes.append(
                GraphNode(
                    f"snapshot-{v.id}",
                    "snapshot",
                    x,
                    sy,
                    f"snapshot {snap_id}",
                    f"{count} records",
                    "node-snapshot",
                )
            )
            lines.append(GraphEdge(x + NODE_W // 2, sy + NODE_H, x + NODE_W // 2, vy, "data"))
        if v.id in jobs:
            job_id, state = jobs[v.id]
            jy = LANE_Y["job"]
            nodes.append(GraphNode(f"job-{v.id}", "job", x, jy, f"job {job_id}", state, "node-job"))
            lines.append(GraphEdge(x + NODE_W // 2, vy + NODE_H, x + NODE_W // 2, jy, "job"))
    for child, parent, relation in edges:
        if child in x_of and parent in x_of:
            lines.append(
                GraphEdge(x_of[parent] + NODE_W, vy + NODE_H // 2, x_of[child], vy + NODE_H // 2, relation)
            )
    width = MARGIN_X * 2 + max(len(ordered), 1) * STEP_X
    return Graph(width, LANE_Y["job"] + NODE_H + 10, tuple(nodes), tuple(lines))


@dataclass(frozen=True)
class Curve:
    label: str
    points: str  # "x,y x,y ..." for <polyline points>
    first: tuple[int, float]
    last: tuple[int, float]


@dataclass(frozen=True)
class CurveChart:
    width: int
    height: int
    curves: tuple[Curve, ...]
    min_loss: float
    max_loss: float
    max_step: int


def loss_chart(
    curves: Mapping[str, Sequence[Sequence[float]]], *, width: int = 320, height: int = 120, pad: int = 8
) -> CurveChart | None:
    """Every curve (``[[step, loss], ...]``, finite points only) on shared axes; None when there is nothing to
    draw."""
    clean = {
        label: [(int(p[0]), float(p[1])) for p in points if len(p) == 2 and math.isfinite(float(p[1]))]
        for label, points in curves.items()
    }
    clean = {label: points for label, points in clean.items() if points}
    if not clean:
        return None
    losses = [loss for points in clean.values() for _, loss in points]
    low, high = min(losses), max(losses)
    max_step = max(step for points in clean.values() for step, _ in points)
    span_loss = (high - low) or 1.0
    span_step = max(max_step - 1, 1)

    def xy(step: int, loss: float) -> str:
        x = pad + (step - 1) / span_step * (width - 2 * pad)
        y = pad + (high - loss) / span_loss * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    drawn = tuple(
        Curve(label, " ".join(xy(s, v) for s, v in points), points[0], points[-1])
        for label, points in sorted(clean.items())
    )
    return CurveChart(width, height, drawn, low, high, max_step)


def heat_colour(loss: float | None, base: float | None) -> str:
    """A cell's background: green where the loss is below the base model's on the same set, red above, pale
    when equal or unknown. Light tints only, so the dark text on them keeps its contrast (WCAG AA)."""
    if loss is None or base is None or not math.isfinite(loss) or not math.isfinite(base) or base <= 0:
        return "#eeeeee"
    change = max(-1.0, min(1.0, (loss - base) / base * 2))  # +-50% of the base's loss is the full colour
    strength = abs(change)
    if change < 0:
        red, green, blue = 255 - 90 * strength, 255 - 10 * strength, 255 - 90 * strength
    else:
        red, green, blue = 255 - 5 * strength, 255 - 110 * strength, 255 - 110 * strength
    return f"#{int(red):02x}{int(green):02x}{int(blue):02x}"


__all__ = [
    "Curve",
    "CurveChart",
    "Graph",
    "GraphEdge",
    "GraphNode",
    "LineageVersion",
    "heat_colour",
    "lineage_graph",
    "loss_chart",
]
