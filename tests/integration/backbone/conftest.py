"""Fixtures for the tests on the real SmolLM2 backbone (converted once per session: ``smollm2_data_dir`` in
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests import torch_threads


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test, as the unit training and serving tests these came from run: on shared,
    loaded cores a second thread spin-waits (ten times slower). Restored afterwards."""
    with torch_threads.one_torch_thread():
        yield
