"""The in-process engine's torch threads leave a core to each trainer actor the API process runs on its own local
Ray (``ApiOptions.serving_threads``). The soak with training beside serving (``bench_soak.py --train``) found
serving on two threads and one trainer actor on two cores at p50 1.3-1.9 s and p99 8-16 s, the train job three
times slower; with one serving thread p50 0.11-0.13 s and p99 0.4-0.6 s."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import services.api.runtime as runtime
import torch
from services.api.errors import ServiceUnavailableError
from services.api.runtime import ApiOptions, EngineHolder, serving_threads
from tests.torch_threads import torch_threads

from lorafleet.errors import ConfigError


@pytest.fixture
def four_threads() -> Iterator[None]:
    with torch_threads(4):
        yield


def _threads_at_build(holder_options: ApiOptions, *, local_trainers: int) -> tuple[int, int]:
    """Torch's threads while the engine is built, on the loading thread and on a thread started then (as the
    batcher's is)."""
    seen: list[int] = []

    def build() -> None:
        seen.append(torch.get_num_threads())
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        raise RuntimeError("no engine: only the threads are checked")

    holder = EngineHolder(build, options=holder_options, local_trainers=local_trainers)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailableError):
        holder.get()
    return seen[0], seen[1]


def test_serving_leaves_a_core_to_each_local_trainer_actor(
    four_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    assert _threads_at_build(ApiOptions(run_workers=1), local_trainers=1) == (3, 3)


def test_without_local_trainers_serving_keeps_its_threads(
    four_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    assert _threads_at_build(ApiOptions(), local_trainers=0) == (4, 4)


def test_configured_serving_threads_win(four_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    assert _threads_at_build(ApiOptions(run_workers=1, serving_threads=2), local_trainers=1) == (2, 2)


def test_serving_threads_rule() -> None:
    assert serving_threads(None, local_trainers=1, current=2, cpus=2) == 1
    assert serving_threads(None, local_trainers=3, current=2, cpus=2) == 1  # at least one
    assert serving_threads(None, local_trainers=1, current=4, cpus=16) == 4  # never more than torch had
    assert serving_threads(None, local_trainers=0, current=2, cpus=2) == 2
    assert serving_threads(5, local_trainers=1, current=2, cpus=2) == 5
    with pytest.raises(ConfigError, match="serving_threads"):
        ApiOptions(serving_threads=0)


def test_only_a_local_ray_counts_the_actors_against_serving() -> None:
    from lorafleet.config import load_settings

    options = ApiOptions(run_workers=2)
    local = runtime._engine_holder(load_settings(ray_address=""), None, None, options)  # type: ignore[arg-type]
    remote = runtime._engine_holder(load_settings(ray_address="10.0.0.1:6379"), None, None, options)  # type: ignore[arg-type]
    assert isinstance(local, EngineHolder) and isinstance(remote, EngineHolder)
    assert (local._local_trainers, remote._local_trainers) == (2, 0)
