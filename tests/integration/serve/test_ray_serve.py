"""Serving on Ray Serve with two replicas on a local Ray (loopback): a user's requests stick to one
replica, answers equal the in-process engine's (same backbone, greedy), a rollback or a promotion of a shared task
adapter is seen by both replicas on their next request, library errors keep their class through Serve, and the API
forwards ``/v1/users/{u}/generate`` to Serve with ``LORAFLEET_SERVING=ray-serve``.

Every user of the shared fleet has a personal adapter and is enrolled in the tenant's task adapter ``support``
(versions 1 and 2, 2 live), and a fixed gate mixes the two in each request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_helpers import ApiServer, Library, live_personal_version, write_adapter_folder
from serve_helpers import REPLICA_OPTIONS
from services.api.app import create_app
from services.api.runtime import ApiOptions

from lorafleet.config import Settings, load_settings
from lorafleet.errors import BlobNotFoundError, ConfigError, NotFoundError, ValidationError
from lorafleet.routing.experts import enrol, set_gate_spec
from lorafleet.routing.spec import GateSpec
from lorafleet.runtime.ray_serve import (
    ReplicaOptions,
    RoutedOutcome,
    ServeClient,
    ServeUnavailableError,
    build_app,
    deployment_options,
    replica_gpus,
    replica_settings,
    user_key,
)
from lorafleet.sdk import Client, errors
from lorafleet.serving.engine import GenerationEngine
from lorafleet.serving.requests import GenerationDelta, GenerationRequest, GenerationResult

PROMPTS = ("Tell me about the weather", "A short story:")
N_USERS = 8
#: every request of the fleet mixes the user's personal adapter and the shared task adapter
MIXTURE = GateSpec(kind="fixed", fixed_weights={"personal": 0.75, "support": 0.5})


@dataclass(frozen=True)
class Fleet:
    """A tenant whose users each have a personal adapter and share the task adapter ``support``."""

    tenant_id: int
    users: tuple[str, ...]
    support_adapter_id: int

    def requests(
        self, users: Sequence[str] | None = None, prompt: str = PROMPTS[0]
    ) -> list[GenerationRequest]:
        return [
            GenerationRequest(tenant_id=self.tenant_id, user=u, prompt=prompt, max_new_tokens=6)
            for u in users or self.users
        ]


class Folders:
    """Real PEFT folders for the tiny backbone, one per seed (a distinct seed: a distinct sha256)."""

    def __init__(self, data_dir: Path, root: Path) -> None:
        self.data_dir, self.root = data_dir, root

    def __call__(self, seed: int) -> Path:
        dest = self.root / f"seed-{seed}"
        return dest if dest.exists() else write_adapter_folder(self.data_dir, dest, seed=seed)


@pytest.fixture(scope="module")
def folders(serve_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Folders:
    return Folders(serve_data_dir, tmp_path_factory.mktemp("serve-adapters"))


@pytest.fixture(scope="module")
def fleet(serve_library: Library, folders: Folders) -> Fleet:
    lib = serve_library
    tenant, _key = lib.tenants.create_tenant(name=f"fleet-{uuid.uuid4().hex[:8]}")
    support = lib.registry.get_or_create_adapter(
        tenant_id=tenant.id, owner_user_id=None, name="support", target_config={}
    )
    for seed in (1, 2):
        lib.registry.register_version(
            tenant_id=tenant.id, adapter_id=support.id, adapter_dir=folders(seed), base_fingerprint="tiny"
        )
    lib.registry.promote(tenant_id=tenant.id, adapter_id=support.id, number=2, actor="test")
    users = tuple(f"user-{i}" for i in range(N_USERS))
    for i, user in enumerate(users):
        live_personal_version(lib, tenant_id=tenant.id, user=user, folder=folders(10 + i))
        enrol(lib.db, tenant_id=tenant.id, user_external_id=user, task_name="support", actor="test")
        set_gate_spec(lib.db, tenant_id=tenant.id, user_external_id=user, spec=MIXTURE, actor="test")
    return Fleet(tenant.id, users, support.id)


#: how long a replica's newly loaded user takes to reach the callers' routers: replicas push their multiplexed
#: model ids every 0.1 s (ray.serve's PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S) to the controller, which long-polls
#: them on to every handle. Until then a user's next call finds no replica holding it and goes to the one with the
#: fewest users, possibly the other one
ROUTING_SETTLE_S = 1.0


def replica_by_user(client: ServeClient, fleet: Fleet) -> dict[str, str]:
    """One request per user, one user at a time (Serve places each new user knowing where the others are, once
    the placement has reached the router: ``ROUTING_SETTLE_S``)."""
    placed = {}
    for request in fleet.requests():
        (routed,) = client.generate_routed([request])
        assert isinstance(routed.outcome, GenerationResult), routed.outcome
        placed[request.user] = routed.replica_id
        time.sleep(ROUTING_SETTLE_S)
    return placed


def support_version(routed: RoutedOutcome) -> int:
    assert isinstance(routed.outcome, GenerationResult), routed.outcome
    (version,) = [s.version for s in routed.outcome.served_by if s.adapter == "support"]
    return version


def assert_same_answer(served: GenerationResult, local: GenerationResult) -> None:
    assert served.token_ids == local.token_ids and served.text == local.text
    assert served.finish_reason == local.finish_reason and served.bank_revision == local.bank_revision
    assert [s.version_id for s in served.served_by] == [s.version_id for s in local.served_by]
    assert [s.weight for s in served.served_by] == pytest.approx(
        [s.weight for s in local.served_by], abs=1e-5
    )


# --- routing and answers ------------------------------------------------------------------------------------
def test_a_users_requests_stick_to_one_replica_and_answer_as_in_process(
    serve_app: ServeClient, fleet: Fleet, local_engine: GenerationEngine
) -> None:
    placed = replica_by_user(serve_app, fleet)
    assert len(set(placed.values())) == 2, f"new users were not spread over both replicas: {placed}"

    # later requests, one at a time, go where each user already is
    for _ in range(2):
        for request in fleet.requests(prompt=PROMPTS[1]):
            (routed,) = serve_app.generate_routed([request])
            assert routed.replica_id == placed[request.user]
    # a mixed list of several users is one concurrent call per user: each user's requests are served together,
    # by one of the two replicas. Serve only prefers the user's replica here: a call that finds it slow to answer
    # Serve's queue probe (busy decoding another user's call) falls back to the replica with the fewest users
    # (ray.serve's multiplex matching), which answers the same (the test below), so no replica is asserted
    mixed = fleet.requests() + fleet.requests(prompt=PROMPTS[1])
    routed_all = serve_app.generate_routed(mixed)
    by_user: dict[str, set[str]] = {}
    for request, routed in zip(mixed, routed_all, strict=True):
        by_user.setdefault(request.user, set()).add(routed.replica_id)
    assert all(len(replicas) == 1 for replicas in by_user.values()), by_user
    assert {r for replicas in by_user.values() for r in replicas} <= set(placed.values())
    stats = serve_app.replica_stats(user_key(fleet.tenant_id, fleet.users[0]))
    assert stats["replica_id"] == placed[fleet.users[0]] and stats["serving"]["rows_adapter"] > 0
    assert stats["prefix_cache"]["lookup_tokens"] > 0  # each replica keeps its own prefix cache

    # the same tokens, versions and weights as the in-process engine, for adapters and for a newcomer, with
    # requests of every form (a conversation and a raw prompt cross the hop whole)
    chat = GenerationRequest(
        tenant_id=fleet.tenant_id, user=fleet.users[0], messages=(("system", "Be brief."), ("user", "Hi"))
    )
    raw = GenerationRequest(tenant_id=fleet.tenant_id, user=fleet.users[1], prompt=PROMPTS[1], raw=True)
    newcomer = GenerationRequest(tenant_id=fleet.tenant_id, user="newcomer", prompt="Hi there")
    with_newcomer = [*mixed, chat, raw, newcomer]
    served = serve_app.generate(with_newcomer)
    local = local_engine.generate(with_newcomer)
    for one, reference in zip(served, local, strict=True):
        assert_same_answer(one, reference)
    assert [(s.adapter, s.weight) for s in served[0].served_by] == [("personal", 0.75), ("support", 0.5)]
    assert served[-1].served_by == ()


def test_a_rollback_and_a_promotion_are_seen_by_both_replicas_on_the_next_request(
    serve_app: ServeClient, fleet: Fleet, serve_library: Library, local_engine: GenerationEngine
) -> None:
    placed = replica_by_user(serve_app, fleet)
    assert len(set(placed.values())) == 2, f"the fleet is not on both replicas: {placed}"
    assert {support_version(r) for r in serve_app.generate_routed(fleet.requests())} == {2}
    registry = serve_library.registry

    registry.rollback(
        tenant_id=fleet.tenant_id, adapter_id=fleet.support_adapter_id, to_number=1, actor="test", reason="v2"
    )
    after = serve_app.generate_routed(fleet.requests())
    assert [support_version(r) for r in after] == [1] * N_USERS
    assert {r.replica_id for r in after} == set(placed.values())  # both replicas served version 1 at once
    for routed, reference in zip(after, local_engine.generate(fleet.requests()), strict=True):
        assert isinstance(routed.outcome, GenerationResult)
        assert_same_answer(routed.outcome, reference)

    registry.promote(tenant_id=fleet.tenant_id, adapter_id=fleet.support_adapter_id, number=2, actor="test")
    again = serve_app.generate_routed(fleet.requests())
    assert [support_version(r) for r in again] == [2] * N_USERS
    assert {r.replica_id for r in again} == set(placed.values())


# --- errors -------------------------------------------------------------------------------------------------
@pytest.fixture
def ghost(serve_library: Library, folders: Folders) -> Iterator[tuple[int, str]]:
    """A user whose live version's blob is gone from the object store (no replica has loaded it)."""
    lib = serve_library
    tenant, _key = lib.tenants.create_tenant(name=f"ghosts-{uuid.uuid4().hex[:8]}")
    live_personal_version(lib, tenant_id=tenant.id, user="ghost", folder=folders(99))
    adapter = lib.registry.find_adapter(
        tenant_id=tenant.id,
        owner_user_id=lib.tenants.get_or_create_user(tenant_id=tenant.id, external_id="ghost").id,
        name="personal",
    )
    assert adapter is not None
    live = lib.registry.live_version(tenant_id=tenant.id, adapter_id=adapter.id)
    assert live is not None
    lib.registry.blobs.delete(live.sha256)
    yield tenant.id, "ghost"


def test_library_errors_keep_their_class_through_serve(
    serve_app: ServeClient, ghost: tuple[int, str], local_engine: GenerationEngine
) -> None:
    tenant_id, user = ghost
    missing = GenerationRequest(tenant_id=tenant_id, user=user, prompt="Hello")
    too_long = GenerationRequest(tenant_id=tenant_id, user="x" * 300, prompt="Hello")
    fine = GenerationRequest(tenant_id=tenant_id, user="someone-new", prompt="Hello")

    served = serve_app.generate_each([missing, too_long, fine])
    local = local_engine.generate_each([missing, too_long, fine])
    assert (
        [type(o) for o in served]
        == [type(o) for o in local]
        == [
            BlobNotFoundError,
            ValidationError,
            GenerationResult,
        ]
    )
    assert isinstance(served[0], NotFoundError) and str(served[0]) == str(local[0])
    assert isinstance(served[2], GenerationResult) and isinstance(local[2], GenerationResult)
    assert_same_answer(served[2], local[2])
    with pytest.raises(NotFoundError):
        serve_app.generate([fine, missing])

    items, _cancel = serve_app.open_stream(
        fine
    )  # streaming: deltas, then the result; errors keep their class
    streamed = list(items)
    assert isinstance(streamed[-1], GenerationResult) and streamed[-1].token_ids == local[2].token_ids
    assert "".join(d.text for d in streamed[:-1] if isinstance(d, GenerationDelta)) == local[2].text
    failing, _cancel = serve_app.open_stream(missing)
    with pytest.raises(BlobNotFoundError):
        list(failing)


def test_a_missing_app_is_unavailable(serve_app: ServeClient, serve_settings: Settings) -> None:
    elsewhere = ServeClient(serve_settings.model_copy(update={"serve_app_name": "no-such-app"}))
    request = GenerationRequest(tenant_id=1, user="anyone", prompt="Hello")
    with pytest.raises(ServeUnavailableError, match="no Ray Serve app 'no-such-app'"):
        elsewhere.generate([request])


# --- the API forwarding to Serve ----------------------------------------------------------------------------
def test_the_api_forwards_generation_to_serve(
    serve_app: ServeClient,
    serve_settings: Settings,
    serve_library: Library,
    folders: Folders,
    ghost: tuple[int, str],
    local_engine: GenerationEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant, api_key = serve_library.tenants.create_tenant(name=f"api-{uuid.uuid4().hex[:8]}")
    live_personal_version(serve_library, tenant_id=tenant.id, user="pia", folder=folders(50))
    monkeypatch.setenv("LORAFLEET_SERVING", "ray-serve")
    overrides = serve_settings.model_dump(exclude={"serving"})
    api_settings = load_settings(**overrides)
    assert api_settings.serving == "ray-serve"
    server = ApiServer(create_app(api_settings, options=ApiOptions(generate_timeout_seconds=120.0))).start()
    try:
        with Client(server.url, api_key, max_retries=0) as client:
            answer = client.generate("pia", PROMPTS[0], max_tokens=6)
            (reference,) = local_engine.generate(
                [GenerationRequest(tenant_id=tenant.id, user="pia", prompt=PROMPTS[0], max_new_tokens=6)]
            )
            assert answer.text == reference.text and answer.versions == {"personal": 1}
            assert answer.usage.completion_tokens == len(reference.token_ids)

        ghost_key = serve_library.tenants.create_api_key(tenant_id=ghost[0])
        with Client(server.url, ghost_key, max_retries=0) as client, pytest.raises(errors.NotFound) as caught:
            client.generate(ghost[1], "Hello", max_tokens=4)
        assert caught.value.code == "blob_not_found" and caught.value.status == 404

        metrics = httpx.get(f"{server.url}/metrics").text
        assert "lorafleet_serve_requests_total 2" in metrics
        assert 'lorafleet_serve_failures_by_code_total{code="blob_not_found"} 1' in metrics
        assert httpx.get(f"{server.url}/readyz").json()["engine"] == "ready"

        with Client(
            server.url, api_key, max_retries=0
        ) as client:  # streamed from the replica, piece by piece
            whole = client.complete("pia", PROMPTS[0], max_tokens=8, temperature=0)
            chunks = list(client.stream_complete("pia", PROMPTS[0], max_tokens=8, temperature=0))
            pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
            assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
            assert chunks[-1].usage == whole.usage
        with Client(server.url, ghost_key, max_retries=0) as client, pytest.raises(errors.NotFound):
            list(client.stream_complete(ghost[1], "Hello", max_tokens=4))  # a 404 before the stream starts
    finally:
        server.stop()


# --- sizing and placement (no Ray needed) -------------------------------------------------------------------
def test_replicas_are_sized_and_placed_from_the_settings() -> None:
    fixed = load_settings(serve_replicas=3, device="cpu")
    options = deployment_options(fixed, REPLICA_OPTIONS, gpus=replica_gpus(fixed))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert options["max_ongoing_requests"] == 16  # 2 x max_batch_size 8 > 2 x target 8

    scaled = load_settings(
        serve_replicas=2, serve_max_replicas=6, serve_target_ongoing_requests=4, device="cpu"
    )
    options = deployment_options(scaled, ReplicaOptions(), gpus=0)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 4,
    }
    with pytest.raises(ConfigError, match="SERVE_MAX_REPLICAS"):
        deployment_options(load_settings(serve_replicas=4, serve_max_replicas=2), ReplicaOptions(), gpus=0)

    cuda = load_settings(device="cuda:1")
    gpus = replica_gpus(cuda)
    assert (
        gpus == 1
        and deployment_options(cuda, ReplicaOptions(), gpus=gpus)["ray_actor_options"]["num_gpus"] == 1
    )
    assert replica_settings(cuda, gpus=gpus)["device"] == "cuda"  # Ray shows the replica its GPU as cuda:0
    assert replica_settings(load_settings(device="auto"), gpus=0)["device"] == "cpu"
    assert "admin_key" not in replica_settings(load_settings(admin_key="secret-key-123"), gpus=0)


def test_build_app_takes_serve_config_args() -> None:
    app = build_app({"settings": {"device": "cpu", "serve_replicas": 2}, "n_slots": 8, "num_cpus": 0.25})
    assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError, match="unknown Ray Serve replica options"):
        build_app({"slots": 8})
