"""``lorafleet demo`` runs beside the rest of the suite.

The demo is the suite's longest test (about seven minutes on 2 cores), and most of that is its own trainer
actors training the real backbone. So when the session reaches ``tests/e2e`` the demo starts as a subprocess in
the background, at the lowest CPU priority (it takes what the other tests leave idle, and barely slows them), and
its test, moved to the end of the session, waits for it and checks what it printed. Run alone
(``pytest -k demo``) it starts and then waits, as before. Nothing about the demo changes: the same command, the
same data dir layout, the same checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_process import DEMO_TEST, BackgroundDemo, start_background_demo


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The demo's test goes last: it only waits for the demo started with the first e2e test."""
    demo = [item for item in items if item.name == DEMO_TEST]
    if demo:
        items[:] = [item for item in items if item.name != DEMO_TEST] + demo


@pytest.fixture(scope="session", autouse=True)
def background_demo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundDemo | None]:
    """Started with the session's first e2e test when the demo's test was collected (``None`` otherwise); a demo
    still running when the session ends is stopped."""
    if not any(item.name == DEMO_TEST for item in request.session.items):
        yield None
        return
    from lorafleet.backbone import default_smollm2_dir

    converted: Path = request.getfixturevalue("smollm2_data_dir")  # converted once per session
    data_dir = tmp_path_factory.mktemp("demo")
    target = default_smollm2_dir(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(default_smollm2_dir(converted), target_is_directory=True)
    demo = start_background_demo(data_dir)
    try:
        yield demo
    finally:
        demo.stop()
