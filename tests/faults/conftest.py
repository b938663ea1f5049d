"""The fault suite's fixtures: the API tests' own (``tests/integration/services/conftest.py``: a real uvicorn
server on PostgreSQL and moto S3, the tiny backbone, tenants made through the API), reused, not copied.

pytest imports every ``conftest.py`` under the name ``conftest`` and then forgets it, so the services conftest is
loaded here from its file under a name of its own and its fixtures are re-exported. Run together with
``tests/integration/services`` in one session, each directory gets its own server and database (they never see
each other's data; the cost is one more server start).

``start_service`` is the service as a process of its own (``service_process.ServiceProcess``), for the tests that
kill it (``kill -9`` mid-ingest, mid-job) or stop it with SIGTERM mid-request.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SERVICES_TESTS = Path(__file__).resolve().parents[1] / "integration" / "services"
#: ``api_helpers`` is imported by that name, as the services tests import it
if str(SERVICES_TESTS) not in sys.path:
    sys.path.append(str(SERVICES_TESTS))


def _load_services_conftest() -> object:
    name = "lorafleet_tests_services_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SERVICES_TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_services = _load_services_conftest()

from api_helpers import ADMIN_KEY  # noqa: E402  (importable once the services tests are on the path)
from service_process import ServiceProcess, service_env  # noqa: E402

api_data_dir = _services.api_data_dir  # type: ignore[attr-defined]
api_pg_url = _services.api_pg_url  # type: ignore[attr-defined]
api_bucket = _services.api_bucket  # type: ignore[attr-defined]
make_api_settings = _services.make_api_settings  # type: ignore[attr-defined]
api = _services.api  # type: ignore[attr-defined]
admin = _services.admin  # type: ignore[attr-defined]
make_tenant = _services.make_tenant  # type: ignore[attr-defined]
tenant = _services.tenant  # type: ignore[attr-defined]
library = _services.library  # type: ignore[attr-defined]
adapter_folder = _services.adapter_folder  # type: ignore[attr-defined]


@pytest.fixture
def start_service(
    api_data_dir: Path, api_pg_url: str, api_bucket: str, moto_endpoint: str, tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    """``start_service(workers=0, **settings)``: a ``ServiceProcess`` (not started yet) for ``lorafleet serve`` on
    the fault suite's PostgreSQL database and moto bucket, with the tiny backbone, its own ``TMPDIR`` and
    ``settings`` as more ``LORAFLEET_*`` variables; whatever is still running at the end is stopped."""
    made: list[ServiceProcess] = []

    def make(*, workers: int = 0, **settings: str) -> ServiceProcess:
        index = len(made)
        tmp_dir = tmp_path / f"service-{index}-tmp"
        tmp_dir.mkdir()
        env = service_env(
            data_dir=api_data_dir,
            database_url=api_pg_url,
            object_store_url=f"s3://{api_bucket}/adapters",
            s3_endpoint=moto_endpoint,
            admin_key=ADMIN_KEY,
            tmp_dir=tmp_dir,
            **settings,
        )
        service = ServiceProcess(env, log_path=tmp_path / f"service-{index}.log", workers=workers)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()
