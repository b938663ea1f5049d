"""Everything the API process holds, in one place: ``ApiOptions``, ``ApiServices`` and ``BackgroundRuntime``.

``ApiServices`` is the library objects the routes call (database, tenants, registry, job queue, scheduler,
idempotency keys, the serving engine) built from ``Settings``. The serving engine is built lazily, on the first
inference request (loading a backbone is slow), or in the background at start with ``preload_engine``;
``/readyz`` reports which. ``BackgroundRuntime`` optionally runs, in this process, the continual-learning
scheduler loop (the blob scrub after each tick) and a pool of Ray trainer actors draining the job queue:
``lorafleet serve`` is the API, the scheduler and the workers together. Stopping the service stops the actors;
a job one of them was running keeps its lease until it expires and is then taken over by the next worker
(nothing is lost, see ``lorafleet.jobs.queue``).

With ``LORAFLEET_SERVING=ray-serve`` the engine runs in the replicas of a Ray Serve app instead
(``lorafleet.runtime.ray_serve``, deployed by ``lorafleet serve-deploy``) and ``ServeEngineHolder`` forwards
requests to it, with the same interface as ``EngineHolder``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from lorafleet.config import Settings
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.feedback import FeedbackLimits
from lorafleet.jobs import JobQueue, Scheduler, SchedulerPolicy
from lorafleet.platform import Platform
from lorafleet.registry import Registry
from lorafleet.serving.metrics import prometheus_text
from lorafleet.serving.options import BatchingOptions
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.idempotency import IdempotencyRepository
from lorafleet.store.sql.models import utcnow
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.general_prompts import ANCHOR_PROMPTS
from lorafleet.workflows.blob_verify import BlobScrubber
from lorafleet.workflows.qa_triggers import on_nonfinite_output
from services.api.errors import ServiceUnavailableError
from services.api.metrics import ApiMetrics

if TYPE_CHECKING:
    from lorafleet.runtime.ray_serve import ServeClient
    from lorafleet.runtime.trainer_pool import TrainerPool
    from lorafleet.serving import ContinuousBatcher, GenerationDelta, GenerationRequest, GenerationResult
    from lorafleet.serving.engine import GenerationEngine

logger = logging.getLogger("lorafleet.api")

EngineState = Literal["not_loaded", "loading", "ready", "failed"]
T = TypeVar("T")
WorkersState = Literal["off", "starting", "running", "failed", "stopped"]


@dataclass(frozen=True)
class ApiOptions(BatchingOptions):
    """How the API process runs (the library's ``Settings`` say where the data is); its serving engine batches
    as ``BatchingOptions`` say."""

    #: run the continual-learning scheduler loop in this process
    run_scheduler: bool = False
    scheduler_interval: float = 30.0
    scheduler_policy: SchedulerPolicy | None = None
    #: trainer actors (Ray) run by this process; 0 = none (workers run elsewhere)
    run_workers: int = 0
    worker_poll_seconds: float = 2.0
    #: the deployment's training defaults (``TrainingConfig`` fields): under every tenant's overrides in the jobs
    #: this process queues, and the workers' config for jobs queued without one
    training: Mapping[str, Any] | None = None
    #: environment variables for the trainer actors (e.g. object store credentials)
    worker_env: Mapping[str, str] | None = None
    #: load the serving engine at start (``/readyz`` is 503 until it is loaded) instead of on first use
    preload_engine: bool = False
    #: backbone quantization for serving; None = ``settings.backbone_quantization``
    serving_quantization: str | None = None
    #: torch's intra-op threads for the in-process engine; None: the process's (torch's default, one per core),
    #: less one per trainer actor this process runs on its own local Ray (``run_workers`` without
    #: ``LORAFLEET_RAY_ADDRESS``), at least one. Each actor computes on a core of its own; a serving thread sharing
    #: that core spin-waits for it at every step, and serving and training both slow down many times over
    #: (``tests/benchmarks/README.md``, "Serving soak")
    serving_threads: int | None = None
    engine_slots: int = 16
    engine_max_rank: int = 16
    generate_timeout_seconds: float = 300.0
    #: request bodies larger than this are refused with 413
    max_body_bytes: int = 8 * 1024 * 1024
    #: a request body that sends nothing for this long is refused with 408 (None: wait as long as it takes)
    body_read_timeout_seconds: float | None = 30.0
    #: a reservation row without a response (left by versions before responses were stored in the write's own
    #: transaction) older than this is taken over by a retry
    idempotency_stale_seconds: float = 300.0
    #: idempotency keys older than this are pruned at start
    idempotency_ttl_seconds: float = 24 * 3600.0
    #: bring the database schema up to date at start (``lorafleet db upgrade``)
    migrate: bool = False

    def __post_init__(self) -> None:
        if self.serving_threads is not None and self.serving_threads < 1:
            raise ConfigError("serving_threads: must be at least 1 (or None: automatic)")


class _LoadOnce(Generic[T]):
    """The state machine both engine holders share: ``not_loaded`` -> ``loading`` -> ``ready``, or ``failed``
    (with ``error``, retried on the next use). ``get`` loads once, under a lock (single flight); a failure to load
    is ``ServiceUnavailableError`` with the reason."""

    #: what a failure to load is called (the error's message and the log line start with it)
    failure: str = "loading failed"
    #: log a failure with its traceback (else one warning line)
    log_traceback: bool = True
    #: the name of the ``preload_in_background`` thread
    preload_thread: str = "lorafleet-preload"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: T | None = None
        self.state: EngineState = "not_loaded"
        self.error: str | None = None

    def _load(self) -> T:
        raise NotImplementedError

    def get(self) -> T:
        """What was loaded, loading it first if needed; ``ServiceUnavailableError`` if that fails."""
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                self.state = "loading"
                try:
                    self._loaded = self._load()
                except Exception as exc:  # any failure to load is "unavailable", with the reason
                    self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                    if self.log_traceback:
                        logger.exception(self.failure)
                    else:
                        logger.warning("%s: %s", self.failure, self.error)
                    raise ServiceUnavailableError(f"{self.failure}: {self.error}") from exc
                self.state, self.error = "ready", None
            return self._loaded

    def preload_in_background(self) -> None:
        def load() -> None:
            try:
                self.get()
            except LorafleetError:
                pass  # recorded in state and error

        threading.Thread(target=load, name=self.preload_thread, daemon=True).start()


class EngineHolder(_LoadOnce["ContinuousBatcher"]):
    """The serving engine behind a continuous batcher, built once on first use (single flight)."""

    failure = "the serving engine failed to load"
    preload_thread = "lorafleet-engine-preload"

    def __init__(
        self, build: Callable[[], GenerationEngine], *, options: ApiOptions, local_trainers: int = 0
    ) -> None:
        """``local_trainers``: trainer actors this process runs on the same machine (each takes a core from
        serving's threads unless ``options.serving_threads`` says how many to use)."""
        super().__init__()
        self._build = build
        self._options = options
        self._local_trainers = local_trainers
        self._engine: GenerationEngine | None = None

    def _load(self) -> ContinuousBatcher:
        import torch  # loaded with the engine, not with the app

        from lorafleet.serving import ContinuousBatcher  # torch, with the engine

        threads = serving_threads(
            self._options.serving_threads,
            local_trainers=self._local_trainers,
            current=torch.get_num_threads(),
            cpus=usable_cpus(),
        )
        if threads != torch.get_num_threads():
            logger.info(
                "serving with %d torch thread(s) (%d core(s), %d local trainer actor(s))",
                threads,
                usable_cpus(),
                self._local_trainers,
            )
            torch.set_num_threads(threads)  # before the engine and its batcher thread exist
        engine = self._build()
        self._engine = engine
        return ContinuousBatcher.from_options(engine, self._options)

    @property
    def serving_engine(self) -> GenerationEngine | None:
        """The engine once loaded (its metrics and adapter cache), else None."""
        return self._engine

    def _open(self) -> ContinuousBatcher:
        batcher = self.get()
        if batcher.closed:
            raise ServiceUnavailableError("the service is shutting down")
        return batcher

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Serve requests (they join the running batch with everyone else's); the first error raises."""
        batcher = self._open()
        futures: list[Future[GenerationResult]] = [batcher.submit(r) for r in requests]
        try:
            return [f.result(timeout=self._options.generate_timeout_seconds) for f in futures]
        except FutureTimeout as exc:
            raise ServiceUnavailableError("generation did not finish in time") from exc
        finally:
            for f in futures:  # after an error or a timeout, the others stop too
                f.cancel()

    async def stream_async(
        self, request: GenerationRequest
    ) -> AsyncIterator[GenerationDelta | GenerationResult]:
        """The request's deltas, then its result (``ContinuousBatcher.stream_async``); the engine is loaded off
        the event loop. Leaving early (a client that disconnected) cancels the request."""
        batcher = await run_in_threadpool(self._open)
        async for item in batcher.stream_async(request):
            yield item

    def metrics_text(self) -> str:
        """The engine's, the adapter cache's and the prefix cache's counters (empty until the engine is loaded)."""
        engine = self._engine
        if engine is None:
            return ""
        return prometheus_text(engine.metrics, engine.cache.stats(), prefix_cache=engine.prefix_cache)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded.close(cancel_pending=True)

    def occupancy(self) -> dict[str, int]:
        """The batcher's queued, ready and running requests (zeros until the engine is loaded)."""
        return {"queued": 0, "ready": 0, "running": 0} if self._loaded is None else self._loaded.occupancy()


class ServeEngineHolder(_LoadOnce["ServeClient"]):
    """``EngineHolder``'s interface over the Ray Serve app (``settings.serving == "ray-serve"``): requests are
    forwarded to its replicas, which batch them; "loading" is connecting to the app (and to Ray) once."""

    failure = "the Ray Serve app is unavailable"
    log_traceback = False  # no Ray, no Serve or no app: one line, with the reason
    preload_thread = "lorafleet-serve-connect"

    def __init__(self, settings: Settings, *, options: ApiOptions) -> None:
        from lorafleet.runtime.ray_serve import ServeClient  # Ray: only when serving through Ray Serve

        super().__init__()
        self._client: ServeClient = ServeClient(settings, timeout_s=options.generate_timeout_seconds)
        self._closed = False

    def _load(self) -> ServeClient:
        self._client.connect()
        return self._client

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Forward to the app (one call per user, in parallel); the first failed request's error raises."""
        from lorafleet.runtime.ray_serve import ServeUnavailableError  # Ray, as in __init__

        if self._closed:
            raise ServiceUnavailableError("the service is shutting down")
        try:
            return self.get().generate(requests)
        except ServeUnavailableError as exc:
            raise ServiceUnavailableError(str(exc)) from exc

    async def stream_async(
        self, request: GenerationRequest
    ) -> AsyncIterator[GenerationDelta | GenerationResult]:
        """The request's deltas from its replica, then its result (``ServeClient.open_stream``, iterated off the
        event loop); leaving early cancels the call on the replica."""
        from lorafleet.runtime.ray_serve import ServeUnavailableError  # Ray, as in __init__

        if self._closed:
            raise ServiceUnavailableError("the service is shutting down")
        try:
            client = await run_in_threadpool(self.get)
            items, cancel = await run_in_threadpool(client.open_stream, request)
            try:
                async for item in iterate_in_threadpool(items):
                    yield item
            finally:
                cancel()
        except ServeUnavailableError as exc:
            raise ServiceUnavailableError(str(exc)) from exc

    def metrics_text(self) -> str:
        """Requests forwarded to Serve, failures by code, time waiting on it (empty until connected)."""
        return self._client.metrics_text() if self._loaded is not None else ""

    def close(self) -> None:
        self._closed = True


@dataclass
class ApiServices:
    """The library objects the routes call, over one database and one object store."""

    settings: Settings
    db: Database
    tenants: TenantRepository
    registry: Registry
    queue: JobQueue
    scheduler: Scheduler
    idempotency: IdempotencyRepository
    engine: EngineHolder | ServeEngineHolder
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    options: ApiOptions = field(default_factory=ApiOptions)

    @classmethod
    def build(
        cls, settings: Settings, options: ApiOptions | None = None, *, metrics: ApiMetrics | None = None
    ) -> ApiServices:
        """Open the database and the object store named by ``settings`` (migrating first with ``migrate``)."""
        options = options or ApiOptions()
        platform = Platform.from_settings(settings, migrate=options.migrate)
        db, registry, queue = platform.db, platform.registry, platform.queue
        stale = timedelta(seconds=options.idempotency_stale_seconds)
        return cls(
            settings=settings,
            db=db,
            tenants=platform.tenants,
            registry=registry,
            queue=queue,
            scheduler=Scheduler(
                db,
                options.scheduler_policy,
                queue=queue,
                training_defaults=options.training,
                max_rank=settings.trainer_max_rank,
            ),
            idempotency=IdempotencyRepository(db, stale_after=stale),
            engine=_engine_holder(settings, db, registry, options),
            metrics=metrics or ApiMetrics(),
            options=options,
        )

    @property
    def feedback_limits(self) -> FeedbackLimits:
        return FeedbackLimits.from_settings(self.settings)

    def database_ok(self) -> bool:
        try:
            self.db.ping()
        except LorafleetError:
            return False
        return True

    def prune_idempotency_keys(self) -> int:
        cutoff = utcnow() - timedelta(seconds=self.options.idempotency_ttl_seconds)
        return self.idempotency.prune(older_than=cutoff)

    def close(self) -> None:
        self.engine.close()
        self.db.dispose()


def _engine_holder(
    settings: Settings, db: Database, registry: Registry, options: ApiOptions
) -> EngineHolder | ServeEngineHolder:
    """The in-process engine (the default), or the client of the Ray Serve app with ``serving=ray-serve``."""
    if settings.serving == "ray-serve":
        return ServeEngineHolder(settings, options=options)
    return EngineHolder(
        lambda: _build_engine(settings, db, registry, options),
        options=options,
        # a local Ray (no address) puts this process's trainer actors on this machine
        local_trainers=0 if settings.ray_address else options.run_workers,
    )


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def serving_threads(configured: int | None, *, local_trainers: int, current: int, cpus: int) -> int:
    """Torch threads for the in-process engine: ``configured`` if set; else ``current`` (torch's count now),
    lowered so that serving and ``local_trainers`` single-core trainer actors fit the machine's ``cpus`` cores
    (at least one thread)."""
    if configured is not None:
        return configured
    if local_trainers <= 0:
        return current
    return max(1, min(current, cpus - local_trainers))


def _build_engine(
    settings: Settings, db: Database, registry: Registry, options: ApiOptions
) -> GenerationEngine:
    from lorafleet.serving.factory import build_engine  # torch and transformers: only when an engine is built

    return build_engine(
        settings,
        db,
        registry,
        n_slots=options.engine_slots,
        max_rank=options.engine_max_rank,
        quantization=options.serving_quantization,
        general_prompts=ANCHOR_PROMPTS,  # the backbone's common direction; the base's side if turned on
        general_to_base=settings.gate_general_prompts,
        # a request whose adapters produced NaN or Inf: QA rechecks the user's experts
        on_nonfinite=lambda bank, members: on_nonfinite_output(db, bank=bank, members=members),
    )


class BackgroundRuntime:
    """The optional scheduler loop and trainer pool of this process (``ApiOptions.run_scheduler`` and
    ``run_workers``), each on its own thread."""

    def __init__(self, services: ApiServices) -> None:
        self.services = services
        self.options = services.options
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pool: TrainerPool | None = None
        self.workers_state: WorkersState = "off"
        self.scheduler_state: Literal["off", "running", "stopped"] = "off"

    def start(self) -> None:
        """Start what the options ask for; Ray is initialised here, on the caller's (main) thread."""
        if self.options.run_scheduler:
            self._spawn("lorafleet-scheduler", self._run_scheduler)
            self.scheduler_state = "running"
        if self.options.run_workers > 0:
            from lorafleet.runtime.ray_runtime import init_ray  # Ray: only with trainer actors

            init_ray(self.services.settings)
            self.workers_state = "starting"
            self._spawn("lorafleet-workers", self._run_workers)

    def stop(self, *, join_seconds: float = 60.0) -> None:
        """Stop the scheduler after its tick and kill the trainer actors (a running job is retried later)."""
        self._stop.set()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        for thread in self._threads:
            thread.join(timeout=join_seconds)
        if self.workers_state != "off":
            self.workers_state = "stopped"
        if self.scheduler_state != "off":
            self.scheduler_state = "stopped"

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run_scheduler(self) -> None:
        """The scheduler loop, each tick followed by the blob scrub the ``LORAFLEET_SCRUB_*`` settings ask for."""
        s = self.services
        scrub = BlobScrubber.from_settings(s.settings, s.db, s.registry, queue=s.queue)
        s.scheduler.run_loop(
            interval_seconds=self.options.scheduler_interval,
            stop_event=self._stop,
            periodic=[scrub] if scrub.enabled else [],
        )

    def _run_workers(self) -> None:
        """Start the pool and keep its actors running jobs until ``stop``; an actor that dies is replaced on its
        own (``TrainerPool.run_until_stopped``), so one lost actor does not stop the others."""
        pool = self._start_pool()
        if pool is None:
            return
        try:
            # ``stop`` kills the actors, which ends this wait at once: a SIGTERM while a slow machine still
            # starts them does not wait for them to load a backbone first
            pool.wait_ready()
            self.workers_state = "running"
            pool.run_until_stopped(
                self._stop, poll_seconds=self.options.worker_poll_seconds, grace_seconds=0.0
            )
        except LorafleetError as exc:  # an actor that cannot even be built: a configuration problem
            if not self._stop.is_set():
                logger.error("the trainer actors failed: %s", exc)
                self.workers_state = "failed"
        finally:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown()

    def _start_pool(self) -> TrainerPool | None:
        from lorafleet.runtime.trainer_pool import TrainerPool  # Ray, as in start

        o = self.options
        try:
            pool = TrainerPool(
                self.services.settings,
                n_actors=o.run_workers,
                training=o.training,
                env_vars=o.worker_env,
                wait_ready=False,  # ``_run_workers`` waits, where ``stop`` can end the wait
            )
        except Exception:
            logger.exception("the trainer actors failed to start")
            self.workers_state = "failed"
            return None
        with self._lock:
            if self._stop.is_set():
                pool.shutdown()
                return None
            self._pool = pool
        return pool


__all__ = [
    "ApiOptions",
    "ApiServices",
    "BackgroundRuntime",
    "EngineHolder",
    "ServeEngineHolder",
    "serving_threads",
    "usable_cpus",
]
