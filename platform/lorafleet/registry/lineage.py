"""Lineage: a version's ancestors and descendants over the lineage edges, with the dataset snapshot, the job
and the QA reports behind each version."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from lorafleet.domain import AdapterVersion, DatasetSnapshot, Job, JobState, LineageEdge
from lorafleet.store.sql.qa_repository import QAReport


@dataclass(frozen=True)
class JobSummary:
    """The job that produced a version, without its payload (which may name other users)."""

    id: int
    kind: str
    state: JobState
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class LineageNode:
    """One version in a lineage, ``distance`` edges from the queried version, with what produced it."""

    version: AdapterVersion
    distance: int
    dataset_snapshot: DatasetSnapshot | None
    job: JobSummary | None
    #: the QA runs on this version, oldest first (``lorafleet.qa``)
    qa_reports: tuple[QAReport, ...] = ()


@dataclass(frozen=True)
class Lineage:
    """A version's ancestors and descendants (nearest first) and the edges between all of them."""

    root: LineageNode
    ancestors: tuple[LineageNode, ...]
    descendants: tuple[LineageNode, ...]
    edges: tuple[LineageEdge, ...]


def _distances(root: int, links: Iterable[tuple[int, int]], depth: int | None) -> dict[int, int]:
    """Breadth-first distance from ``root`` over ``(from, to)`` links, up to ``depth``."""
    nexts: dict[int, list[int]] = {}
    for src, dst in links:
        nexts.setdefault(src, []).append(dst)
    dist, queue = {root: 0}, deque([root])
    while queue:
        here = queue.popleft()
        if depth is not None and dist[here] >= depth:
            continue
        for there in nexts.get(here, ()):
            if there not in dist:
                dist[there] = dist[here] + 1
                queue.append(there)
    return dist


def _nodes(
    nodes: Mapping[int, tuple[AdapterVersion, DatasetSnapshot | None, Job | None]],
    dist: Mapping[int, int],
    *,
    exclude: int,
) -> tuple[LineageNode, ...]:
    ids = sorted((d, i) for i, d in dist.items() if i != exclude and i in nodes)
    return tuple(_node(nodes[i], d) for d, i in ids)


def _node(row: tuple[AdapterVersion, DatasetSnapshot | None, Job | None], distance: int) -> LineageNode:
    version, snapshot, job = row
    summary = (
        None if job is None else JobSummary(job.id, job.kind, job.state, job.created_at, job.finished_at)
    )
    return LineageNode(version=version, distance=distance, dataset_snapshot=snapshot, job=summary)


def _with_qa_reports(lineage: Lineage, reports: Mapping[int, Sequence[QAReport]]) -> Lineage:
    def attach(node: LineageNode) -> LineageNode:
        return replace(node, qa_reports=tuple(reports.get(node.version.id, ())))

    return replace(
        lineage,
        root=attach(lineage.root),
        ancestors=tuple(attach(n) for n in lineage.ancestors),
        descendants=tuple(attach(n) for n in lineage.descendants),
    )
