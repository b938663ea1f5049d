"""``TrainerPool.run_until_stopped`` while its caller stops it: ``BackgroundRuntime.stop`` sets the stop event,
then kills the actors (``TrainerPool.shutdown``). A run call that a kill ends must not be taken for an actor that
died: the soak with training beside serving (``bench_soak.py --train``) logged "trainer actor ... died; starting a
replacement" at every shutdown, released the killed actor's leases and started a new actor only to kill it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from lorafleet.runtime.trainer_pool import TrainerPool


class _Remote:
    def __init__(self, make: Any) -> None:
        self.remote = make


class _Trainer:
    started = True
    replacement = False
    worker_id = "trainer-1"
    node_id = "node-1"

    def __init__(self) -> None:
        self.handle = type("Handle", (), {"run_once": _Remote(lambda: "run-ref")})()


class _Pool:
    """What ``_PoolLoop`` uses of a ``TrainerPool``, recording replacements and lease releases."""

    def __init__(self) -> None:
        self.trainers = [_Trainer()]
        self.replaced = 0
        self.released: list[str] = []

    def _new_trainer(self, *, replacement: bool = False) -> Any:
        self.replaced += 1
        trainer = _Trainer()
        trainer.ping_ref = "ping-ref"  # type: ignore[attr-defined]
        return trainer

    def release_leases_of(self, worker_id: str, *, cause: str) -> list[int]:
        self.released.append(worker_id)
        return []

    def _log_waiting(self) -> None:
        pass


def test_an_actor_killed_by_the_stop_is_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()

    def wait(refs: list[Any], *, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        stop.set()  # meanwhile the caller stops the loop and kills the actor: its run call ends now
        return list(refs)[:num_returns], []

    def get(ref: Any) -> Any:
        raise RayActorError()  # what a killed actor's call raises

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    pool = _Pool()
    done = TrainerPool.run_until_stopped(pool, stop, poll_seconds=0.0, grace_seconds=0.0)  # type: ignore[arg-type]
    assert done == []
    assert (pool.replaced, pool.released) == (0, [])


def test_an_actor_that_dies_while_the_pool_runs_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    calls = []

    def wait(refs: list[Any], *, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        calls.append(list(refs))
        if len(calls) > 1:
            stop.set()
            return [], list(refs)
        return list(refs)[:num_returns], []

    def get(ref: Any) -> Any:
        raise RayActorError()  # the actor died on its own (its node was lost)

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    pool = _Pool()
    TrainerPool.run_until_stopped(pool, stop, poll_seconds=0.0, grace_seconds=0.0)  # type: ignore[arg-type]
    assert (pool.replaced, pool.released) == (1, ["trainer-1"])
