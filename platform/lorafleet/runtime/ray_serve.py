"""Serving on Ray Serve: replicas that each hold a backbone, an adapter cache and the gates, with every user's
requests routed to the replicas that already hold that user's adapters.

Routing. Each call carries Serve's *multiplexed model id*, set to the user's key ``"<tenant_id>/<user>"``
(``user_key``). Serve prefers a replica that has loaded that "model", so a user's requests stick to a replica
whose adapter cache already holds the user's weights, and new users go to the replica holding the fewest. A
preference, not a guarantee: a call that finds its user's replica slow to answer Serve's queue probe (busy
decoding, as when a mixed list sends several users' calls at once), or comes within about a second of the user's
first call (replicas report the users they hold every 0.1 s, and the controller passes that on to the callers),
falls back to the replica with the fewest users, which loads the user's adapters and answers the same.

Why the multiplexed "model" is only a cheap ``UserHandle``, never the user's experts or weights: a rollback or a
promotion must be seen by every replica on its next request. The engine already guarantees that: it resolves
each user's experts from the database once per batch and keys every cached adapter by its content hash
(sha256), so a moved ``live`` alias changes what the next batch loads, on any replica. Caching a bank in the
multiplex loader would instead serve the old versions until Serve's LRU happened to evict the user. So the
loader only names the user; its LRU (``serve_max_models_per_replica``) decides routing affinity, while the
weights live in the engine's byte-budgeted adapter cache.

Batching. Inside a replica, requests of all users share one ``ContinuousBatcher`` (one forward pass serves
many users, and a request joins the running batch at the next decoding step). Serve's own ``@serve.batch`` is
not used: it forms static batches, split by multiplexed model id (one user each).

Streaming. ``ServingReplica.stream`` is a generator method: ``ServeClient.open_stream`` calls it with
``stream=True`` and iterates the deltas, then the result, as they are decoded; cancelling the call cancels the
request's row on the replica.
Requests cross the hop whole (prompt or ``messages``, ``raw``): the replica's engine renders them with its
tokenizer (``backbone.chat``), so the API needs none.

Errors. A replica returns each request's outcome as a value (a ``GenerationResult`` or a ``LorafleetError``),
so library errors reach the caller with their own class (a ``BlobNotFoundError`` stays a ``NotFoundError``);
a failure of Serve itself (no app, no replica, a timeout) is a ``ServeUnavailableError``.

Entry points: ``build_app`` (the import path ``lorafleet.runtime.ray_serve:build_app`` of a KubeRay
RayService's ``serveConfigV2``), ``deploy(settings)`` (``lorafleet serve-deploy``), and ``ServeClient``, which
the API uses when ``LORAFLEET_SERVING=ray-serve``. Importing this module does not import ray (it loads torch,
as ``serving.factory`` does).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, cast

from lorafleet.config import Settings, load_settings
from lorafleet.errors import ConfigError, LorafleetError, ValidationError
from lorafleet.platform import Platform
from lorafleet.runtime.ray_runtime import actor_settings, init_ray
from lorafleet.serving.continuous import ContinuousBatcher
from lorafleet.serving.factory import build_engine
from lorafleet.serving.options import BatchingOptions
from lorafleet.serving.requests import (
    GenerationDelta,
    GenerationRequest,
    GenerationResult,
    Outcome,
    results_or_first_error,
)
from lorafleet.training.general_prompts import ANCHOR_PROMPTS
from lorafleet.workflows.qa_triggers import on_nonfinite_output

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

    from lorafleet.serving.engine import GenerationEngine

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "serving"
DEFAULT_HTTP_PORT = 8000


class ServeError(LorafleetError):
    """The Ray Serve application could not be deployed."""

    code = "serve_error"


class ServeUnavailableError(ServeError):
    """Ray Serve cannot answer now: the app is not deployed, no replica answers, or the call timed out."""

    code = "service_unavailable"


# --- what travels between the client and a replica --------------------------------------------------------
def user_key(tenant_id: int, user: str | None) -> str:
    """The multiplexed model id of a user: ``"<tenant_id>/<user external id>"`` (``"<tenant_id>/"`` for requests
    without a user, which every replica serves alike)."""
    return f"{tenant_id}/{user or ''}"


@dataclass(frozen=True)
class UserHandle:
    """A replica's multiplexed "model" for one user: only who the user is (see the module docstring)."""

    tenant_id: int
    user: str | None

    @classmethod
    def from_key(cls, key: str) -> UserHandle:
        tenant, sep, user = key.partition("/")
        if not sep or not tenant.isdigit():
            raise ValidationError(f"multiplexed model id {key!r} is not '<tenant_id>/<user>'")
        return cls(int(tenant), user or None)


@dataclass(frozen=True)
class ReplicaReply:
    """A replica's answer to one call: who served it, and one outcome per request, in order."""

    replica_id: str
    outcomes: list[Outcome]


@dataclass(frozen=True)
class RoutedOutcome:
    """One request's outcome and the replica that produced it."""

    outcome: Outcome
    replica_id: str


@dataclass(frozen=True)
class ReplicaOptions(BatchingOptions):
    """How each replica is built and placed (the settings say what it serves and where the data is); its
    continuous batch batches as ``BatchingOptions`` say."""

    #: adapter bank slots and maximum rank of each replica's engine
    n_slots: int = 16
    max_rank: int = 16
    #: backbone quantization; None = ``settings.backbone_quantization``
    quantization: str | None = None
    #: CPUs reserved per replica (fractions allowed); GPUs follow the device setting (``replica_gpus``)
    num_cpus: float = 1.0
    #: calls a replica takes at once; None = max(2 * max_batch_size, 2 * serve_target_ongoing_requests)
    max_ongoing_requests: int | None = None
    #: environment variables for the replicas (e.g. object store credentials)
    env_vars: Mapping[str, str] | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ReplicaOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ConfigError(f"unknown Ray Serve replica options {unknown}; known: {sorted(known)}")
        options = cls(**dict(values or {}))
        if options.n_slots < 1 or options.max_rank < 1 or options.max_batch_size < 1 or options.num_cpus < 0:
            raise ConfigError("replica options: n_slots, max_rank, max_batch_size >= 1 and num_cpus >= 0")
        return options


# --- the replica -------------------------------------------------------------------------------------------
class ServingReplica:
    """One Serve replica: a ``GenerationEngine`` (from ``factory.build_engine``) behind a ``ContinuousBatcher``.

    Built by Serve from ``serving_app``; it needs a Serve replica context (``serve.multiplexed``)."""

    def __init__(self, settings: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        from ray import serve

        s = load_settings(**settings)
        o = ReplicaOptions.from_mapping(options)
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        self._closed = False
        self._platform: Platform = Platform.from_settings(s)
        self.engine: GenerationEngine = build_engine(
            s,
            self._platform.db,
            self._platform.registry,
            n_slots=o.n_slots,
            max_rank=o.max_rank,
            quantization=o.quantization,
            general_prompts=ANCHOR_PROMPTS,
            general_to_base=s.gate_general_prompts,
            on_nonfinite=lambda bank, members: on_nonfinite_output(
                self._platform.db, bank=bank, members=members
            ),
        )
        self._queue: ContinuousBatcher = ContinuousBatcher.from_options(self.engine, o)

        async def open_user(key: str) -> UserHandle:  # cheap on purpose: no bank, no weights
            return UserHandle.from_key(key)

        # built per instance: the LRU size is a setting, and serve.multiplexed fixes it when it wraps
        self._open_user = serve.multiplexed(max_num_models_per_replica=s.serve_max_models_per_replica)(
            open_user
        )
        logger.info("replica %s ready on %s", self.replica_id, self.engine.backbone.device)

    async def generate(self, requests: Sequence[GenerationRequest]) -> ReplicaReply:
        """Serve one user's requests (the call's multiplexed model id) in the replica's shared batches."""
        from ray import serve

        key = serve.get_multiplexed_model_id()
        try:
            user = UserHandle.from_key(key)
        except ValidationError as exc:  # no key, or not a user's
            return ReplicaReply(self.replica_id, [exc for _ in requests])
        await self._open_user(key)  # tells Serve's router that this replica now serves the user
        done = await asyncio.gather(*(self._submit(user, r) for r in requests), return_exceptions=True)
        return ReplicaReply(self.replica_id, [_as_outcome(o) for o in done])

    async def _submit(self, user: UserHandle, request: GenerationRequest) -> GenerationResult:
        _check_routed(user, request)
        return await self._queue.submit_async(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | Outcome]:
        """Stream one request (the call's multiplexed model id is its user's): its deltas as they are decoded,
        then its result, or its library error as the last item (a value, so it keeps its class)."""
        from ray import serve

        try:
            user = UserHandle.from_key(serve.get_multiplexed_model_id())
            _check_routed(user, request)
            await self._open_user(user_key(user.tenant_id, user.user))
            async for item in self._queue.stream_async(request):
                yield item
        except LorafleetError as exc:
            yield exc

    def stats(self) -> dict[str, Any]:
        """This replica's id, the engine's counters, the adapter cache's and the prefix cache's (None: off)."""
        cache = asdict(self.engine.cache.stats())
        return {
            "replica_id": self.replica_id,
            "serving": self.engine.metrics.snapshot(),
            "cache": cache,
            "prefix_cache": None if self.engine.prefix_cache is None else self.engine.prefix_cache.snapshot(),
        }

    def close(self) -> None:
        """Cancel what is queued and close the database pool; a second call does nothing."""
        if getattr(self, "_closed", True):  # closed already, or __init__ failed before opening anything
            return
        self._closed = True
        queue: ContinuousBatcher | None = getattr(self, "_queue", None)
        platform: Platform | None = getattr(self, "_platform", None)
        if queue is not None:
            queue.close(cancel_pending=True)
        if platform is not None:
            platform.close()

    def __enter__(self) -> ServingReplica:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # Ray Serve's only shutdown hook for a replica is its ``__del__``: it is ``close`` itself, nothing more.
    __del__ = close


def _check_routed(user: UserHandle, request: GenerationRequest) -> None:
    if (request.tenant_id, request.user) != (user.tenant_id, user.user):
        raise ValidationError(
            f"a request of {user_key(request.tenant_id, request.user)!r} was routed as "
            f"{user_key(user.tenant_id, user.user)!r}"
        )


def _as_outcome(value: object) -> Outcome:
    """A request's result or its library error (any other exception becomes a plain ``LorafleetError``)."""
    if isinstance(value, GenerationResult | LorafleetError):
        return value
    if isinstance(value, asyncio.CancelledError):
        return ServeUnavailableError("the request was cancelled")
    return LorafleetError(f"{type(value).__name__}: {value}")


# --- the application ---------------------------------------------------------------------------------------
def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The application builder of ``serveConfigV2`` (``import_path: lorafleet.runtime.ray_serve:build_app``).

    ``args``: ``settings`` (overrides of the ``LORAFLEET_*`` environment of the Ray node that builds the app)
    and any ``ReplicaOptions`` field (``n_slots``, ``quantization``, ``num_cpus``, ...)."""
    values = dict(args or {})
    settings = load_settings(**dict(values.pop("settings", None) or {}))
    return serving_app(settings, ReplicaOptions.from_mapping(values))


def serving_app(settings: Settings, options: ReplicaOptions | None = None) -> Application:
    """The ``ServingReplica`` deployment, sized and placed from the settings, bound to its arguments."""
    from ray import serve

    options = options or ReplicaOptions()
    gpus = replica_gpus(settings)
    deployment = serve.deployment(**deployment_options(settings, options, gpus=gpus))(ServingReplica)
    return deployment.bind(replica_settings(settings, gpus=gpus), asdict(options))


def deployment_options(settings: Settings, options: ReplicaOptions, *, gpus: int) -> dict[str, Any]:
    """Serve's deployment options: a fixed replica count, or autoscaling between ``serve_replicas`` and
    ``serve_max_replicas`` on ``serve_target_ongoing_requests``; CPUs and GPUs per replica."""
    actor: dict[str, Any] = {"num_cpus": options.num_cpus, "num_gpus": gpus}
    if options.env_vars:
        actor["runtime_env"] = {"env_vars": dict(options.env_vars)}
    target = settings.serve_target_ongoing_requests
    ongoing = options.max_ongoing_requests or max(2 * options.max_batch_size, math.ceil(2 * target))
    result: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": ongoing,
    }
    if settings.serve_max_replicas is None:
        result["num_replicas"] = settings.serve_replicas
    elif settings.serve_max_replicas < settings.serve_replicas:
        raise ConfigError(
            f"LORAFLEET_SERVE_MAX_REPLICAS ({settings.serve_max_replicas}) is below LORAFLEET_SERVE_REPLICAS "
            f"({settings.serve_replicas}), the autoscaling minimum"
        )
    else:
        result["autoscaling_config"] = {
            "min_replicas": settings.serve_replicas,
            "max_replicas": settings.serve_max_replicas,
            "target_ongoing_requests": target,
        }
    return result


def replica_gpus(settings: Settings) -> int:
    """One GPU per replica when the device setting asks for CUDA, or is ``auto`` on a cluster that has GPUs
    (the rule of the trainer actors' placement)."""
    if settings.device.startswith("cuda"):
        return 1
    if settings.device == "auto":
        ray = sys.modules.get("ray")  # not imported here: ray must be imported after ``init_ray``'s setup
        if ray is None or not ray.is_initialized():
            return 0
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return 0


def replica_settings(settings: Settings, *, gpus: int) -> dict[str, Any]:
    """The settings a replica is built from (absolute paths, no secrets: ``actor_settings``), with the device
    its placement gives it: ``cuda`` with a GPU (Ray shows a replica only its own GPU, as device 0, so
    ``cuda:N`` would not exist there), and ``cpu`` for ``auto`` without one (never a GPU Ray did not give)."""
    data = actor_settings(settings)
    if gpus:
        data["device"] = "cuda"
    elif settings.device == "auto":
        data["device"] = "cpu"
    return data


def deploy(
    settings: Settings, options: ReplicaOptions | None = None, *, http_port: int = DEFAULT_HTTP_PORT
) -> DeploymentHandle:
    """Run (or update in place) the app ``settings.serve_app_name`` on the configured Ray and wait until it
    is running; a local Ray's HTTP proxy binds to 127.0.0.1. The app has no HTTP route (callers use handles)."""
    init_ray(settings)
    from ray import serve

    if _local_ray(settings):
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    app = serving_app(settings, options)
    try:
        return serve.run(app, name=settings.serve_app_name, route_prefix=None)
    except Exception as exc:  # Serve reports a failed deployment (e.g. a replica that cannot start) as such
        raise ServeError(f"deploying the Ray Serve app {settings.serve_app_name!r} failed: {exc}") from exc


def _local_ray(settings: Settings) -> bool:
    host = settings.ray_address.split("://", 1)[-1].rsplit(":", 1)[0]
    return not settings.ray_address or host in ("127.0.0.1", "localhost")


# --- the client --------------------------------------------------------------------------------------------
class ServeClient:
    """Forwards ``GenerationRequest`` lists to the Serve app through a ``DeploymentHandle``: one call per user
    (multiplexed by ``user_key``), outcomes back in request order. Thread-safe; connects on first use."""

    def __init__(self, settings: Settings, *, timeout_s: float = 300.0) -> None:
        self.settings, self.timeout_s = settings, timeout_s
        self._handle: DeploymentHandle | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._seconds = 0.0
        self._replicas: set[str] = set()

    def connect(self) -> DeploymentHandle:
        """The app's handle (after ``init_ray``); ``ServeUnavailableError`` when the app is not there."""
        with self._lock:
            if self._handle is None:
                self._handle = self._open_handle()
            return self._handle

    def _open_handle(self) -> DeploymentHandle:
        ray = sys.modules.get("ray")
        if not self.settings.ray_address and (ray is None or not ray.is_initialized()):
            raise ServeUnavailableError(
                "LORAFLEET_RAY_ADDRESS is empty and this process runs no Ray: set it to the Ray cluster "
                "where `lorafleet serve-deploy` runs the app"
            )
        init_ray(self.settings)
        from ray import serve
        from ray.serve.exceptions import RayServeException

        name = self.settings.serve_app_name
        try:
            return serve.get_app_handle(name)
        except RayServeException as exc:
            raise ServeUnavailableError(
                f"no Ray Serve app {name!r} on the Ray cluster ({exc}); deploy it: `lorafleet serve-deploy`"
            ) from exc

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Results in request order; the first failed request's error is raised (as the in-process engine)."""
        return results_or_first_error(self.generate_each(requests))

    def generate_each(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        """Each request's result or its own library error."""
        return [routed.outcome for routed in self.generate_routed(requests)]

    def generate_routed(self, requests: Sequence[GenerationRequest]) -> list[RoutedOutcome]:
        """Each request's outcome with the id of the replica that served it."""
        handle = self.connect()
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(user_key(request.tenant_id, request.user), []).append(index)
        started = time.monotonic()
        deadline = started + self.timeout_s
        calls = [
            (indexes, _call(handle, key, [requests[i] for i in indexes])) for key, indexes in groups.items()
        ]
        routed: list[RoutedOutcome | None] = [None] * len(requests)
        try:
            for indexes, response in calls:
                reply = self._reply(response, deadline=deadline, expected=len(indexes))
                for index, outcome in zip(indexes, reply.outcomes, strict=True):
                    routed[index] = RoutedOutcome(outcome, reply.replica_id)
        except BaseException:
            for _, response in calls:
                response.cancel()
            raise
        done = [r for r in routed if r is not None]
        self._record(done, calls=len(calls), seconds=time.monotonic() - started)
        return done

    def open_stream(
        self, request: GenerationRequest
    ) -> tuple[Iterator[GenerationDelta | GenerationResult], Callable[[], None]]:
        """Stream one request through its user's replica: an iterator of its deltas, then its result (its error
        raises, Serve's failures as ``ServeUnavailableError``), and a function that cancels the call."""
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        handle = self.connect()
        key = user_key(request.tenant_id, request.user)
        response = cast(
            "DeploymentResponseGenerator[Any]",
            handle.options(method_name="stream", multiplexed_model_id=key, stream=True).remote(request),
        )

        def items() -> Iterator[GenerationDelta | GenerationResult]:
            started = time.monotonic()
            outcome: Outcome | None = None
            try:
                for item in response:
                    if isinstance(item, GenerationDelta):
                        yield item
                    elif isinstance(item, GenerationResult | LorafleetError):
                        outcome = item
                        break
                    else:
                        raise ServeUnavailableError(
                            f"unexpected item from the Ray Serve app: {type(item).__name__}"
                        )
            except (RayServeException, RayError) as exc:
                self._count_failure(ServeUnavailableError.code)
                raise ServeUnavailableError(
                    f"Ray Serve could not stream the call: {_first_line(exc)}"
                ) from exc
            if outcome is None:
                raise ServeUnavailableError("the Ray Serve stream ended without a result")
            # a stream does not say which replica served it (the replica set is counted from unary calls)
            self._record([RoutedOutcome(outcome, "")], calls=1, seconds=time.monotonic() - started)
            if isinstance(outcome, LorafleetError):
                raise outcome
            yield outcome

        return items(), response.cancel

    def _reply(self, response: DeploymentResponse, *, deadline: float, expected: int) -> ReplicaReply:
        """A call's reply, with Ray's and Serve's failures as ``ServeUnavailableError``."""
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import RayServeException

        try:
            reply = response.result(timeout_s=max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            self._count_failure(ServeUnavailableError.code)
            raise ServeUnavailableError(f"Ray Serve did not answer within {self.timeout_s:g} s") from exc
        except RayTaskError as exc:  # the replica method raised: keep a library error's own class
            if isinstance(exc.cause, LorafleetError):
                raise exc.cause from None
            self._count_failure(ServeUnavailableError.code)
            raise ServeUnavailableError(f"a Ray Serve replica failed: {_first_line(exc)}") from exc
        except (RayServeException, RayError) as exc:
            self._count_failure(ServeUnavailableError.code)
            raise ServeUnavailableError(f"Ray Serve could not serve the call: {_first_line(exc)}") from exc
        if not isinstance(reply, ReplicaReply) or len(reply.outcomes) != expected:
            raise ServeUnavailableError(f"unexpected reply from the Ray Serve app: {type(reply).__name__}")
        return reply

    def replica_stats(self, key: str) -> dict[str, Any]:
        """``ServingReplica.stats`` of the replica a call keyed ``key`` is routed to (for tests and tools)."""
        response = self.connect().options(method_name="stats", multiplexed_model_id=key).remote()
        return dict(response.result(timeout_s=self.timeout_s))

    # --- counters for the API's /metrics -------------------------------------------------------------------
    def _record(self, done: Sequence[RoutedOutcome], *, calls: int, seconds: float) -> None:
        with self._lock:
            self._counts["calls"] += calls
            self._counts["requests"] += len(done)
            self._seconds += seconds
            for routed in done:
                if routed.replica_id:
                    self._replicas.add(routed.replica_id)
                if isinstance(routed.outcome, LorafleetError):
                    self._counts["requests_failed"] += 1
                    self._failures[routed.outcome.code] += 1

    def _count_failure(self, code: str) -> None:
        with self._lock:
            self._failures[code] += 1

    def metrics_text(self, *, prefix: str = "lorafleet") -> str:
        """Forwarded requests and calls, failures by code, time spent waiting on Serve, replicas seen."""
        name = f"{prefix}_serve"
        with self._lock:
            lines = [f"{name}_{k}_total {self._counts[k]}" for k in ("requests", "requests_failed", "calls")]
            lines += [
                f'{name}_failures_by_code_total{{code="{code}"}} {n}'
                for code, n in sorted(self._failures.items())
            ]
            lines.append(f"{name}_call_seconds_total {self._seconds:.6f}")
            lines.append(f"{name}_replicas_seen {len(self._replicas)}")
        return "\n".join(lines) + "\n"


def _call(handle: DeploymentHandle, key: str, requests: list[GenerationRequest]) -> DeploymentResponse[Any]:
    """``ServingReplica.generate`` for one user's requests, routed by the user's multiplexed model id."""
    response = handle.options(method_name="generate", multiplexed_model_id=key).remote(requests)
    return cast("DeploymentResponse[Any]", response)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


__all__ = [
    "DEPLOYMENT_NAME",
    "ReplicaOptions",
    "ReplicaReply",
    "RoutedOutcome",
    "ServeClient",
    "ServeError",
    "ServeUnavailableError",
    "ServingReplica",
    "UserHandle",
    "build_app",
    "deploy",
    "deployment_options",
    "serving_app",
    "user_key",
]
