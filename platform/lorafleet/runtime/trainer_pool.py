"""A pool of trainer actors (``lorafleet.runtime.ray_runtime.TrainerHost`` on Ray) and its long-running loop.

``TrainerPool`` places ``n_actors`` actors by ``TrainerPlacement`` (one CPU, one unit of the trainer resource, a
GPU when training on CUDA, spread over nodes), waits for them to load their backbones, and drains the job queue
with them. ``run_until_stopped`` is the loop of ``lorafleet workers``: it replaces an actor that died, one at a
time, and ends the dead actor's leases at once, so the jobs it held are retried now rather than when their leases
run out (a node lost without the pool noticing still costs them the lease); an actor the cluster has no room for
waits, and the pool logs why every ``wait_log_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.config import Settings
from lorafleet.domain.closing import ClosesOnExit
from lorafleet.errors import ConfigError, JobError, LorafleetError
from lorafleet.jobs import JobQueue
from lorafleet.jobs.placement import TrainerPlacement, placement_capacity
from lorafleet.runtime.ray_runtime import actor_settings, init_ray, trainer_actor_class
from lorafleet.store.sql.database import Database

logger = logging.getLogger(__name__)


@dataclass
class _Trainer:
    """One actor of a pool: its handle, its first ``ping`` (answered once its backbone is loaded) and, from
    then on, who and where it is."""

    handle: Any
    ping_ref: Any
    created: float
    #: made after an actor of the pool died (not one the pool started with)
    replacement: bool = False
    worker_id: str | None = None
    node_id: str | None = None
    last_wait_log: float = 0.0
    killed: bool = False

    @property
    def started(self) -> bool:
        return self.worker_id is not None


class TrainerPool(ClosesOnExit):
    """``n_actors`` trainer actors placed by ``TrainerPlacement`` (see the module docstring).

    With ``wait_ready`` (the default) the constructor returns once every actor has loaded its backbone (or
    raises ``JobError`` after ``start_timeout`` seconds); without it, actors start in the background and
    ``run_until_stopped`` uses each as soon as it is up.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        n_actors: int = 1,
        training: Mapping[str, Any] | None = None,
        env_vars: Mapping[str, str] | None = None,
        qa_policy: Mapping[str, Any] | None = None,
        spread: bool = True,
        wait_ready: bool = True,
        start_timeout: float | None = None,
        wait_log_seconds: float = 30.0,
    ) -> None:
        if n_actors < 1:
            raise ConfigError("n_actors: must be at least 1")
        import ray

        self.settings = settings
        self.gcs_address = init_ray(settings)
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        self.placement = TrainerPlacement.for_settings(settings, cluster_gpus=gpus, spread=spread)
        options = self.placement.ray_options()
        if env_vars:
            options["runtime_env"] = {"env_vars": dict(env_vars)}
        self._actor_class = trainer_actor_class().options(**options)
        overrides = {**actor_settings(settings), "device": self.placement.device}
        self._init_args = (overrides, dict(training or {}), dict(qa_policy or {}))
        self.wait_log_seconds = wait_log_seconds
        self._warn_about_capacity(n_actors)
        self.trainers = [self._new_trainer() for _ in range(n_actors)]
        if wait_ready:
            try:
                self.wait_ready(timeout=start_timeout)
            except BaseException:
                self.shutdown()
                raise

    @property
    def actors(self) -> list[Any]:
        """The actor handles, started or still waiting for room in the cluster."""
        return [t.handle for t in self.trainers]

    @property
    def workers(self) -> list[str]:
        """The worker ids of the started actors, in pool order."""
        return [t.worker_id for t in self.trainers if t.worker_id is not None]

    @property
    def nodes(self) -> dict[str, str | None]:
        """Ray node id by worker id, for the started actors."""
        return {t.worker_id: t.node_id for t in self.trainers if t.worker_id is not None}

    def _new_trainer(self, *, replacement: bool = False) -> _Trainer:
        handle = self._actor_class.remote(*self._init_args)
        now = time.monotonic()
        return _Trainer(handle, handle.ping.remote(), now, replacement=replacement, last_wait_log=now)

    # --- starting -----------------------------------------------------------------------------------------
    def _warn_about_capacity(self, n_actors: int) -> None:
        """Say at once when the cluster cannot hold the actors asked for (they would wait, maybe forever)."""
        capacity = self._capacity()
        if capacity == 0:
            logger.warning(
                "no alive node of the Ray cluster offers %s, so trainer actors wait until one joins; give "
                "training nodes the resource (ray start --resources='{\"%s\": 1}') or set "
                "LORAFLEET_TRAINER_RESOURCE='' to place them by CPU/GPU alone",
                self.placement.describe(),
                self.placement.resource or "<name>",
            )
        elif capacity < n_actors:
            logger.warning(
                "the Ray cluster has room for %d trainer actors of %s in total; %d asked, so %d wait for room",
                capacity,
                self.placement.describe(),
                n_actors,
                n_actors - capacity,
            )

    def wait_ready(self, *, timeout: float | None = None) -> None:
        """Wait until every actor has loaded its backbone, logging the ones without room every
        ``wait_log_seconds``; an actor that fails to start, or ``timeout`` passing, raises ``JobError``, and so
        does ``shutdown`` from another thread (its killed actors end the wait at once)."""
        import ray

        started = time.monotonic()
        while waiting := {t.ping_ref: t for t in self.trainers if not t.started}:
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                raise JobError(self._waiting_message(list(waiting.values()), after=timeout or 0.0))
            step = self.wait_log_seconds if left is None else min(self.wait_log_seconds, left)
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=step)  # a failed start raises at once
            for ref in ready:
                self._record_start(waiting[ref])
            self._log_waiting()
        logger.info("%d trainer actors ready in %.1f s", len(self.trainers), time.monotonic() - started)

    def _record_start(self, trainer: _Trainer) -> None:
        """Read a first ``ping`` (``JobError`` if the actor failed to start) and log where the actor is."""
        (info,) = _get([trainer.ping_ref], what="starting a trainer actor")
        trainer.worker_id, trainer.node_id = info["worker_id"], info.get("node_id")
        logger.info(
            "trainer actor %s ready on node %s (%s) after %.1f s",
            trainer.worker_id,
            trainer.node_id,
            info.get("device"),
            time.monotonic() - trainer.created,
        )

    def _log_waiting(self) -> None:
        """Every ``wait_log_seconds``: which actors still wait for room, what they need, what there is."""
        now = time.monotonic()
        due = [t for t in self.trainers if not t.started and now - t.last_wait_log >= self.wait_log_seconds]
        if due:
            logger.warning("%s", self._waiting_message(due, after=now - min(t.created for t in due)))
            for t in due:
                t.last_wait_log = now

    def _waiting_message(self, waiting: list[_Trainer], *, after: float) -> str:
        return (
            f"{len(waiting)} of {len(self.trainers)} trainer actors not started after {after:.0f} s; each "
            f"needs {self.placement.describe()} on one node, and the alive nodes of the cluster have room for "
            f"{self._capacity()} such actors in total (in use or not)"
        )

    def _capacity(self) -> int:
        """How many trainer actors of this pool's placement the cluster's alive nodes have room for in all."""
        import ray

        return placement_capacity(ray.nodes(), self.placement.demand())

    # --- running jobs -------------------------------------------------------------------------------------
    def drain(self, *, max_jobs: int | None = None, timeout: float | None = None) -> list[int]:
        """Every actor runs jobs until none is claimable; the ids of the jobs run, over all actors."""

        refs = [actor.run_until_idle.remote(max_jobs) for actor in self.actors]
        return [
            job_id for ids in _get(refs, what="draining the job queue", timeout=timeout) for job_id in ids
        ]

    def run_until_stopped(
        self,
        stop: threading.Event,
        *,
        poll_seconds: float = 5.0,
        grace_seconds: float = 20.0,
        start_timeout: float | None = None,
    ) -> list[int]:
        """Keep every actor running jobs until ``stop`` is set; the ids of the jobs run.

        Each actor runs jobs one after another and asks again ``poll_seconds`` after finding none. An actor
        that dies (its node was lost, or it was killed) is replaced by a new one, which waits for room in
        the cluster; its leases are released at once (``release_leases_of``), so the job it held is retried by
        whichever actor claims it next, not when the lease runs out. An
        actor whose constructor fails raises ``JobError`` (a configuration problem no restart fixes), and so
        do actors of the initial pool not started within ``start_timeout``. After ``stop``, jobs in flight
        get ``grace_seconds`` to finish; the caller then shuts the pool down."""
        return _PoolLoop(self, poll_seconds=poll_seconds, start_timeout=start_timeout).run(
            stop, grace_seconds=grace_seconds
        )

    def stats(self) -> list[dict[str, Any]]:
        return list(_get([actor.stats.remote() for actor in self.actors], what="reading trainer stats"))

    def release_leases_of(self, worker_id: str, *, cause: str) -> list[int]:
        """A dead actor's leases end now, so its job is retried at once rather than when the lease runs out;
        a failure to reach the database is logged (the lease then expires as before)."""
        db = Database(self.settings.resolved_database_url)
        try:
            released = JobQueue(db).release_leases_of(
                worker_id, reason=f"trainer actor {worker_id} died: {cause}"
            )
        except LorafleetError as exc:
            logger.warning("could not release the leases of dead actor %s: %s", worker_id, exc)
            return []
        finally:
            db.dispose()
        if released:
            logger.info("released the leases of dead actor %s: job(s) %s", worker_id, released)
        return released

    def shutdown(self) -> None:
        """Stop the actors (a job one of them was running is taken over once its lease expires); ``workers``
        and ``nodes`` still say who they were."""
        import ray

        for trainer in self.trainers:
            if not trainer.killed:
                ray.kill(trainer.handle)
                trainer.killed = True

    close = shutdown  # what leaving the ``with`` block calls


class _PoolLoop:
    """The state of ``TrainerPool.run_until_stopped``: one call in flight per actor (its first ``ping``, or a
    ``run_once``), and when each idle actor asks for its next job."""

    #: longest wait for a call to answer before looking at ``stop`` and the waiting actors again
    TICK_SECONDS = 0.5

    def __init__(self, pool: TrainerPool, *, poll_seconds: float, start_timeout: float | None) -> None:
        self.pool = pool
        self.poll_seconds = poll_seconds
        self.start_deadline = None if start_timeout is None else time.monotonic() + start_timeout
        self.start_timeout = start_timeout
        self.calls: dict[Any, tuple[int, str]] = {}  # in-flight ref -> (actor index, "ping" | "run")
        self.next_run: dict[int, float] = {}  # idle actor index -> monotonic time of its next run_once
        self.done: list[int] = []
        for i, trainer in enumerate(pool.trainers):
            if trainer.started:
                self.next_run[i] = 0.0
            else:
                self.calls[trainer.ping_ref] = (i, "ping")

    def run(self, stop: threading.Event, *, grace_seconds: float) -> list[int]:
        import ray

        while not stop.is_set():
            self._start_due_runs()
            if not self.calls:
                stop.wait(max(0.0, min(self.next_run.values(), default=0.0) - time.monotonic()))
                continue
            ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=self.TICK_SECONDS)
            for ref in ready:
                if stop.is_set():  # the caller is killing the actors (``shutdown``): none of them is replaced
                    break
                self._settle(ref)
            self.pool._log_waiting()
            self._check_start_deadline()
        self._finish(grace_seconds)
        return self.done

    def _start_due_runs(self) -> None:
        now = time.monotonic()
        for i in [i for i, at in self.next_run.items() if at <= now]:
            del self.next_run[i]
            self.calls[self.pool.trainers[i].handle.run_once.remote()] = (i, "run")

    def _settle(self, ref: Any) -> None:
        """Read one answered call and decide what its actor does next."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        i, kind = self.calls.pop(ref)
        trainer = self.pool.trainers[i]
        try:
            if kind == "ping":
                self.pool._record_start(trainer)
                self.next_run[i] = time.monotonic()
                return
            job_id = ray.get(ref)
        except JobError as exc:  # the first ping failed: a constructor error, or death before it answered
            if isinstance(exc.__cause__, RayActorError) and not exc.__cause__.actor_init_failed:
                self._replace(i, exc.__cause__)
                return
            raise
        except ActorUnavailableError as exc:  # unreachable for now (e.g. a network blip): ask again later
            logger.warning("trainer actor %s unavailable (%s); asking again later", trainer.worker_id, exc)
        except RayActorError as exc:
            self._replace(i, exc)
            return
        except Exception as exc:  # run_once raised (e.g. the database is away): the actor lives on
            logger.warning("trainer actor %s: %s: %s", trainer.worker_id, type(exc).__name__, exc)
        else:
            if job_id is not None:
                self.done.append(int(job_id))
                logger.info("job %s ran on trainer actor %s", job_id, trainer.worker_id)
                self.next_run[i] = time.monotonic()
                return
        self.next_run[i] = time.monotonic() + self.poll_seconds

    def _replace(self, i: int, error: Exception) -> None:
        """A dead actor: start a new one in its place (it waits for room; its job waits for its lease)."""
        old = self.pool.trainers[i]
        first = str(error).strip().splitlines()[:1]
        logger.warning(
            "trainer actor %s on node %s died (%s); starting a replacement (its leases are released: a job "
            "it held is retried at once)",
            old.worker_id or "(not started)",
            old.node_id,
            first[0] if first else type(error).__name__,
        )
        if old.worker_id is not None:
            self.pool.release_leases_of(old.worker_id, cause=first[0] if first else type(error).__name__)
        new = self.pool._new_trainer(replacement=True)
        self.pool.trainers[i] = new
        self.calls[new.ping_ref] = (i, "ping")

    def _check_start_deadline(self) -> None:
        if self.start_deadline is None or time.monotonic() < self.start_deadline:
            return
        waiting = [t for t in self.pool.trainers if not t.started and not t.replacement]
        if waiting:
            raise JobError(self.pool._waiting_message(waiting, after=self.start_timeout or 0.0))
        self.start_deadline = None

    def _finish(self, grace_seconds: float) -> None:
        """Give jobs in flight ``grace_seconds`` to finish, and count the ones that did."""
        import ray

        runs = [ref for ref, (_i, kind) in self.calls.items() if kind == "run"]
        if not runs:
            return
        logger.info("stopping: waiting up to %.0f s for the jobs in flight to finish", grace_seconds)
        ready, _ = ray.wait(runs, num_returns=len(runs), timeout=grace_seconds)
        for ref in ready:
            try:
                job_id = ray.get(ref)
            except Exception as exc:  # the actor died or the call failed: its job waits for its lease
                logger.warning("a job in flight ended with %s", type(exc).__name__)
                continue
            if job_id is not None:
                self.done.append(int(job_id))


def _get(refs: list[Any], *, what: str, timeout: float | None = None) -> list[Any]:
    """``ray.get`` with Ray's failures translated: a timeout or a dead actor is a ``JobError`` (a job the
    actor was running stays leased until the lease expires, then another actor takes it over)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return list(ray.get(refs, timeout=timeout))
    except GetTimeoutError as exc:
        raise JobError(f"{what}: no answer within {timeout} s") from exc
    except RayActorError as exc:
        first = str(exc).strip().splitlines()[:1]
        raise JobError(f"{what}: a trainer actor died ({first[0] if first else type(exc).__name__})") from exc


__all__ = ["TrainerPool"]
