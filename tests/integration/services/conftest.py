"""Fixtures for the API and SDK tests: a real uvicorn server on 127.0.0.1 (a free port), PostgreSQL (a database
of these tests' own) and S3 over HTTP (moto), the built-in tiny backbone, and tenants made through the API.

One server (``api``) serves the whole session; every test makes its own tenants, so tests never see each
other's data. Servers that run trainer actors (Ray) are started by the training tests themselves.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: ``services`` (the runnable processes) is not an installed package: import it from the checkout (appended, so
#: nothing in the checkout shadows an installed or standard module)
REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import pytest  # noqa: E402
from api_helpers import (  # noqa: E402
    ADMIN_KEY,
    AWS_TEST_ENV,
    SERVING_OPTIONS,
    ApiServer,
    Library,
    LiveVersions,
    TenantHandle,
    write_adapter_folder,
)
from services.api.app import create_app  # noqa: E402
from tests.databases import migrated_pg_database  # noqa: E402
from tests.tiny import seeded_folders, tiny_backbone_dir  # noqa: E402

from lorafleet.config import Settings, load_settings  # noqa: E402
from lorafleet.platform import Platform  # noqa: E402
from lorafleet.sdk import Client  # noqa: E402

for _name, _value in AWS_TEST_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def api_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the built-in tiny backbone built into it (servers and trainer actors load it there)."""
    return tiny_backbone_dir(tmp_path_factory, "lorafleet-api-data")


@pytest.fixture(scope="session")
def api_pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database for these tests alone (others truncate the shared one between tests)."""
    with migrated_pg_database("lorafleet_api") as url:
        yield url


@pytest.fixture(scope="session")
def api_bucket(moto_endpoint: str) -> str:
    import boto3

    name = f"lf-api-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def make_api_settings(
    api_data_dir: Path, api_pg_url: str, api_bucket: str, moto_endpoint: str
) -> Callable[..., Settings]:
    """``make_api_settings(**overrides)``: PostgreSQL, S3 (moto), the tiny nf4 backbone, the admin key."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": api_data_dir,
            "database_url": api_pg_url,
            "object_store_url": f"s3://{api_bucket}/adapters",
            "s3_endpoint_url": moto_endpoint,
            "backbone_quantization": "nf4",
            "device": "cpu",
            "ray_address": "",
            "admin_key": ADMIN_KEY,
            "promote_rule": "never",
            "trainer_slots": 2,
            **overrides,
        }
        return load_settings(**values)

    return make


@pytest.fixture(scope="session")
def api(make_api_settings: Callable[..., Settings]) -> Iterator[ApiServer]:
    """The session's API server (no workers, no scheduler), serving with the fp32 tiny backbone."""
    server = ApiServer(create_app(make_api_settings(max_feedback_batch=50), options=SERVING_OPTIONS))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def admin(api: ApiServer) -> Iterator[Client]:
    with Client(api.url, ADMIN_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def make_tenant(api: ApiServer, admin: Client) -> Iterator[Callable[[], TenantHandle]]:
    clients: list[Client] = []

    def make() -> TenantHandle:
        created = admin.create_tenant(f"tenant-{uuid.uuid4().hex[:10]}")
        client = Client(api.url, created.api_key, max_retries=2, backoff=0.05)
        clients.append(client)
        return TenantHandle(created.id, created.name, created.api_key, client)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def tenant(make_tenant: Callable[[], TenantHandle]) -> TenantHandle:
    """A fresh tenant of this test's own (``make_tenant`` for more than one)."""
    return make_tenant()


@pytest.fixture(scope="session")
def library(make_api_settings: Callable[..., Settings]) -> Iterator[Library]:
    with Platform.from_settings(make_api_settings()) as platform:
        yield platform


@pytest.fixture(scope="session")
def adapter_folder(api_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``adapter_folder(seed)``: a real PEFT folder for the tiny backbone (written once per seed)."""
    return seeded_folders(
        tmp_path_factory.mktemp("adapters"),
        lambda dest, seed: write_adapter_folder(api_data_dir, dest, seed=seed),
    )


@pytest.fixture
def live(tenant: TenantHandle, library: Library, adapter_folder: Callable[[int], Path]) -> LiveVersions:
    """Live adapter versions made straight in ``tenant``'s store (``live.personal(user, seed)``, ``live.task``)."""
    return LiveVersions(library, tenant.id, adapter_folder)


@pytest.fixture(scope="session")
def api_ray(make_api_settings: Callable[..., Settings]) -> Iterator[str]:
    """A local Ray on 127.0.0.1, started on the main thread (the servers' trainer pools then join it)."""
    import ray

    from lorafleet.runtime.ray_runtime import init_ray

    address = init_ray(make_api_settings(ray_num_cpus=4))
    yield address
    ray.shutdown()
