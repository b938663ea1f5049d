"""Fixtures for serving on Ray Serve: a PostgreSQL database and a local blob directory of these tests' own,
the tiny backbone (fp32, as the other serving tests), the Serve app with two replicas on the session's local Ray
(loopback; started here if no other fixture started it), and an in-process engine over the same data to
compare answers with.

The app is deployed once per module and shut down at its end (``serve.shutdown``), so its replicas do not hold
CPUs while other tests run; replicas take half a CPU each, as trainer actors need CPUs too.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

# Serve waits this long for the router to learn which replica holds a user before it falls back to the
# replica with the fewest users; the default (1-2 s) is enough on an idle machine, not always on two busy cores.
os.environ.setdefault("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "10")
# The router first asks the replica that holds a user for its queue length; an answer later than the deadline
# (0.1 s, doubling to 1 s by default: a busy replica on two loaded cores can miss it) counts as a refusal, and the
# retry goes to the replica with the fewest users, which can be the other one. Stickiness is what these tests check.
os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "2")
os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5")

#: the API tests' helpers (a uvicorn server in a thread, real adapter folders, PostgreSQL's admin conninfo)
SERVICES_TESTS = Path(__file__).resolve().parents[1] / "services"
if str(SERVICES_TESTS) not in sys.path:
    sys.path.append(str(SERVICES_TESTS))

import pytest  # noqa: E402
from api_helpers import AWS_TEST_ENV, Library  # noqa: E402
from serve_helpers import REPLICA_OPTIONS, free_port, init_local_ray  # noqa: E402
from tests.databases import migrated_pg_database  # noqa: E402
from tests.tiny import tiny_backbone_dir  # noqa: E402

from lorafleet.config import Settings, load_settings  # noqa: E402
from lorafleet.platform import Platform  # noqa: E402
from lorafleet.runtime.ray_serve import ServeClient  # noqa: E402
from lorafleet.serving.engine import GenerationEngine  # noqa: E402

for _name, _value in AWS_TEST_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="module")
def serve_pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database for these tests alone (replicas connect to it from their processes)."""
    with migrated_pg_database("lorafleet_serve") as url:
        yield url


@pytest.fixture(scope="module")
def serve_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_backbone_dir(tmp_path_factory, "lorafleet-serve-data")


@pytest.fixture(scope="module")
def serve_settings(serve_data_dir: Path, serve_pg_url: str) -> Settings:
    """Two fixed replicas of an app of this module's own name, on the tiny fp32 backbone, on the CPU."""
    return load_settings(
        data_dir=serve_data_dir,
        database_url=serve_pg_url,
        object_store_url=(serve_data_dir / "blobs").as_uri(),
        backbone_quantization="fp32",
        device="cpu",
        ray_address="",
        ray_num_cpus=4,
        serving="ray-serve",
        serve_app_name=f"lorafleet-test-{uuid.uuid4().hex[:8]}",
        serve_replicas=2,
        serve_max_models_per_replica=16,
    )


@pytest.fixture(scope="module")
def serve_library(serve_settings: Settings) -> Iterator[Library]:
    with Platform.from_settings(serve_settings) as platform:
        yield platform


@pytest.fixture(scope="module")
def serve_app(serve_settings: Settings) -> Iterator[ServeClient]:
    """The app deployed with ``deploy`` (two replicas), and a client of it; Serve is shut down afterwards (and
    Ray too when this fixture started it)."""
    import ray

    from lorafleet.runtime.ray_serve import deploy

    started_here = init_local_ray(serve_settings)
    from ray import serve

    try:
        deploy(serve_settings, REPLICA_OPTIONS, http_port=free_port())
        yield ServeClient(serve_settings, timeout_s=120.0)
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_engine(serve_settings: Settings, serve_library: Library) -> GenerationEngine:
    """The in-process engine over the same database, object store and backbone (the reference answers)."""
    from lorafleet.serving.factory import build_engine

    return build_engine(
        serve_settings,
        serve_library.db,
        serve_library.registry,
        n_slots=REPLICA_OPTIONS.n_slots,
        max_rank=REPLICA_OPTIONS.max_rank,
    )
