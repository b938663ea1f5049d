"""Fixtures over the real parts: PostgreSQL on 127.0.0.1:5432, SQLite files, moto's S3 server on loopback.

Each test session creates its own PostgreSQL database (and drops it at the end); each test gets a clean,
migrated schema. ``database`` is parametrised over SQLite and PostgreSQL; ``blob_store`` over the local
directory and S3 over HTTP.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# A local Ray must bind to loopback only; set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tests run on the random-init tiny backbone unless they ask for the real one (the product's default).
os.environ.setdefault("LORAFLEET_BACKBONE", "builtin:tiny")
# Keep torch from fighting over the 2 shared cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
from sqlalchemy import text  # noqa: E402
from tests.databases import migrated_pg_database  # noqa: E402

from lorafleet.store.sql import migrate  # noqa: E402
from lorafleet.store.sql.database import Database, create_db_engine  # noqa: E402
from lorafleet.store.sql.models import Base  # noqa: E402

if TYPE_CHECKING:
    from lorafleet.backbone import Backbone


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session (fails loudly if PostgreSQL is down)."""
    with migrated_pg_database("lorafleet_test") as url:
        yield url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per session; tests get copies (migrating each time would be slow)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


def _truncate_all(url: str) -> None:
    engine = create_db_engine(url)
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "lorafleet.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A clean, migrated database URL: a SQLite copy, or the session's PostgreSQL database truncated."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    url = str(request.getfixturevalue("pg_url"))
    _truncate_all(url)
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def sqlite_database(sqlite_url: str) -> Iterator[Database]:
    """SQLite only, for tests about something other than the database (adapter files, engine set-up)."""
    db = Database(sqlite_url)
    yield db
    db.dispose()


@pytest.fixture
def pg_database(pg_url: str) -> Iterator[Database]:
    """PostgreSQL only, for tests about real concurrency (row locks, many connections)."""
    _truncate_all(pg_url)
    db = Database(pg_url)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a random port), for S3 over real HTTP."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"lf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def blob_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return (tmp_path / "blobs").as_uri()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/adapters"


@pytest.fixture
def blob_store(blob_store_url: str, request: pytest.FixtureRequest) -> object:
    """A ``BlobStore`` on a local directory or on S3 over HTTP (moto)."""
    from lorafleet.store.blob import open_blob_store

    endpoint = request.getfixturevalue("moto_endpoint") if blob_store_url.startswith("s3://") else None
    return open_blob_store(blob_store_url, endpoint_url=endpoint, region="us-east-1")


@pytest.fixture(scope="session")
def smollm2_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the converted SmolLM2 backbone, converted once per test session (about 30 s).

    Tests that need their own data dir link the converted folder in with the ``smollm2_in`` fixture.
    """
    from lorafleet.backbone import build_smollm2_backbone

    data_dir = tmp_path_factory.mktemp("smollm2-data")
    build_smollm2_backbone(data_dir)
    return data_dir


@pytest.fixture
def smollm2_in(smollm2_data_dir: Path) -> Callable[[Path], Path]:
    """``smollm2_in(data_dir)``: the session's converted SmolLM2 folder linked into ``data_dir`` (no second
    conversion); returns ``data_dir``."""
    from lorafleet.backbone import default_smollm2_dir

    def link(data_dir: Path) -> Path:
        target = default_smollm2_dir(data_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(default_smollm2_dir(smollm2_data_dir), target_is_directory=True)
        return data_dir

    return link


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny backbone's folder, built once per session (the adapter, serving and training tests
    load it)."""
    # imported here, as in the fixtures below: it loads torch, which most tests do not need
    from lorafleet.backbone import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("lorafleet-data"))


@pytest.fixture
def fp32_backbone(tiny_dir: Path) -> Backbone:
    """The tiny backbone in fp32 on the CPU, loaded afresh for each test (tests inject banks into it)."""
    from lorafleet.backbone import load_backbone

    return load_backbone(tiny_dir, quantization="fp32", device="cpu")
