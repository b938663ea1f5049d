"""``/metrics`` behind its own token (finding 10 of issue 18): with ``LORAFLEET_METRICS_TOKEN`` set, a scrape
without it, or with a tenant's or the admin's key, is 401; with it, the page as usual. Without the setting the page
stays open (``tests/integration/services``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from api_helpers import ADMIN_KEY, SERVING_OPTIONS, ApiServer
from services.api.app import create_app

from lorafleet.config import Settings

TOKEN = "scrape-me-" + "x" * 24


@pytest.fixture(scope="module")
def guarded_api(make_api_settings: Callable[..., Settings]) -> Iterator[ApiServer]:
    server = ApiServer(create_app(make_api_settings(metrics_token=TOKEN), options=SERVING_OPTIONS))
    server.start()
    yield server
    server.stop()


def test_metrics_need_the_metrics_token_when_one_is_set(guarded_api: ApiServer) -> None:
    with httpx.Client(base_url=guarded_api.url, timeout=60) as http:
        assert http.get("/metrics").status_code == 401
        for wrong in (ADMIN_KEY, TOKEN[:-1], "lf_not-a-key"):
            assert http.get("/metrics", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        page = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert page.status_code == 200 and "lorafleet_http_requests_total" in page.text
        assert http.get("/healthz").status_code == 200  # liveness stays open
