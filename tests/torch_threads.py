"""Torch's intra-op threads set for a block, the count before restored afterwards. One thread (``one_torch_thread``)
for tests on shared, loaded cores, where a second intra-op thread spin-waits (ten times slower for the small models
the tests run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_torch_thread() -> AbstractContextManager[None]:
    return torch_threads(1)
