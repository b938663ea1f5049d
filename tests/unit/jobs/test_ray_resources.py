"""Where trainer actors go (``lorafleet.jobs.placement``): the Ray options and resource demand the settings
ask for, how many actors a cluster's nodes hold, and the ``lorafleet workers`` arguments refused before any
Ray starts."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.config import load_settings
from lorafleet.entrypoints.cli import build_parser, main
from lorafleet.jobs.placement import TrainerPlacement, placement_capacity


def _placement(*, cluster_gpus: float = 0.0, **settings: Any) -> TrainerPlacement:
    return TrainerPlacement.for_settings(load_settings(**settings), cluster_gpus=cluster_gpus)


def test_a_cpu_actor_takes_one_cpu_and_one_trainer_unit_and_spreads() -> None:
    placement = _placement(device="cpu", cluster_gpus=4)
    assert (placement.gpu, placement.device) == (False, "cpu")
    assert placement.ray_options() == {
        "num_cpus": 1,
        "num_gpus": 0,
        "max_concurrency": 2,
        "resources": {"lorafleet_trainer": 1},
        "scheduling_strategy": "SPREAD",
    }
    assert placement.demand() == {"CPU": 1.0, "lorafleet_trainer": 1.0}
    assert placement.describe() == "1 CPU + 1 lorafleet_trainer"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_actor_takes_one_gpu_and_trains_on_the_gpu_ray_assigns(device: str) -> None:
    placement = _placement(device=device, cluster_gpus=0)  # asked for: it waits for a GPU node to join
    assert (placement.gpu, placement.device) == (True, "cuda")
    assert placement.ray_options()["num_gpus"] == 1
    assert placement.demand() == {"CPU": 1.0, "GPU": 1.0, "lorafleet_trainer": 1.0}


@pytest.mark.parametrize(("cluster_gpus", "gpu"), [(0.0, False), (0.5, False), (1.0, True), (8.0, True)])
def test_auto_takes_a_gpu_only_on_a_cluster_with_gpus(cluster_gpus: float, gpu: bool) -> None:
    placement = _placement(device="auto", cluster_gpus=cluster_gpus)
    assert placement.gpu is gpu
    assert placement.device == ("cuda" if gpu else "cpu")  # never "auto" inside an actor
    assert placement.ray_options()["num_gpus"] == int(gpu)


def test_no_custom_resource_and_no_spread() -> None:
    placement = TrainerPlacement.for_settings(
        load_settings(device="cpu", trainer_resource=""), cluster_gpus=0, spread=False
    )
    options = placement.ray_options()
    assert "resources" not in options and "scheduling_strategy" not in options
    assert placement.demand() == {"CPU": 1.0}
    assert _placement(device="cpu", trainer_resource="big_box").demand()["big_box"] == 1.0


def _node(alive: bool = True, **resources: float) -> dict[str, Any]:
    return {"Alive": alive, "Resources": resources}


def test_capacity_counts_alive_nodes_by_their_scarcest_resource() -> None:
    demand = {"CPU": 1.0, "lorafleet_trainer": 1.0}
    nodes = [
        _node(CPU=1.0),  # the head: no trainer unit
        _node(CPU=1.0, lorafleet_trainer=1.0),
        _node(CPU=4.0, lorafleet_trainer=2.0),
        _node(CPU=1.0, lorafleet_trainer=8.0),
        _node(False, CPU=8.0, lorafleet_trainer=8.0),  # lost
    ]
    assert placement_capacity(nodes, demand) == 0 + 1 + 2 + 1
    assert placement_capacity(nodes, {"CPU": 1.0, "GPU": 1.0}) == 0
    assert placement_capacity([_node(CPU=16.0, GPU=2.0)], {"CPU": 1.0, "GPU": 1.0}) == 2
    assert placement_capacity([], demand) == 0


def test_the_workers_command_line() -> None:
    args = build_parser().parse_args(["workers", "--count", "3", "--poll-seconds", "0.5"])
    assert (args.count, args.poll_seconds, args.grace_seconds, args.start_timeout) == (3, 0.5, 20.0, None)
    assert (args.until_idle, args.training) == (False, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--poll-seconds", "0"], "--poll-seconds must be positive"),
        (["--training", "{not json"], "--training: not JSON"),
        (["--training", "[1, 2]"], "--training: must be a JSON object"),
        (["--training", '{"rank": 0}'], "rank"),
        (["--training", '{"no_such_field": 1}'], "no_such_field"),
    ],
)
def test_bad_workers_arguments_exit_2_before_ray_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["workers", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [validation_error]:") and message in err, err
