"""Where trainer actors go on a Ray cluster: the resources one actor asks for, and how many such actors the
cluster's nodes can hold. Plain data (no ray import), so the rules are testable without a cluster.

Each actor takes one CPU, one unit of the custom resource ``settings.trainer_resource`` (``lorafleet_trainer``
by default: operators give it to the nodes meant for training, e.g. ``ray start --resources='{"lorafleet_trainer":
1}'``) and, when it trains on CUDA, one GPU. Actors are spread over nodes (Ray's ``SPREAD`` strategy) so the
jobs of a pool run on as many machines as it has actors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafleet.config import Settings

#: one job at a time per actor; the second thread answers ``ping``/``stats`` while a job runs
ACTOR_CONCURRENCY = 2


@dataclass(frozen=True)
class TrainerPlacement:
    """What one trainer actor asks Ray for, and the device it trains on there.

    ``gpu``: the actor takes one GPU and trains on it (``cuda``); otherwise it trains on the CPU. The device
    setting decides: ``cpu``, ``cuda``/``cuda:N`` (on Ray, the GPU Ray assigns; ``N`` only matters in-process),
    or ``auto``: a GPU when the cluster has any. On a cluster that mixes CPU and GPU nodes, ``auto`` therefore
    trains on the GPU nodes only; set ``device=cpu`` to train on the CPU nodes.
    """

    gpu: bool
    #: custom resource of which each actor takes one unit ("" = none: CPU/GPU alone decide)
    resource: str
    #: spread the actors over nodes (Ray's SPREAD strategy) rather than packing them
    spread: bool = True

    @classmethod
    def for_settings(
        cls, settings: Settings, *, cluster_gpus: float, spread: bool = True
    ) -> TrainerPlacement:
        """The placement ``settings`` ask for on a cluster with ``cluster_gpus`` GPUs in total."""
        if settings.device == "auto":
            gpu = cluster_gpus >= 1
        else:
            gpu = settings.device.startswith("cuda")
        return cls(gpu=gpu, resource=settings.trainer_resource, spread=spread)

    @property
    def device(self) -> str:
        """The device setting an actor of this placement trains with."""
        return "cuda" if self.gpu else "cpu"

    def demand(self) -> dict[str, float]:
        """The resources one actor takes, by Ray's names."""
        demand = {"CPU": 1.0}
        if self.gpu:
            demand["GPU"] = 1.0
        if self.resource:
            demand[self.resource] = 1.0
        return demand

    def ray_options(self) -> dict[str, Any]:
        """Options for ``ActorClass.options``."""
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": 1 if self.gpu else 0,
            "max_concurrency": ACTOR_CONCURRENCY,
        }
        if self.resource:
            options["resources"] = {self.resource: 1}
        if self.spread:
            options["scheduling_strategy"] = "SPREAD"
        return options

    def describe(self) -> str:
        return " + ".join(f"{amount:g} {name}" for name, amount in self.demand().items())


def placement_capacity(nodes: Iterable[Mapping[str, Any]], demand: Mapping[str, float]) -> int:
    """How many actors taking ``demand`` fit on the alive ``nodes`` (``ray.nodes()`` entries), counting each
    node's total resources, whether in use or not."""
    capacity = 0
    for node in nodes:
        if not node.get("Alive", False):
            continue
        offered: Mapping[str, float] = node.get("Resources") or {}
        capacity += min(int(offered.get(name, 0.0) // amount) for name, amount in demand.items())
    return capacity


__all__ = ["ACTOR_CONCURRENCY", "TrainerPlacement", "placement_capacity"]
