"""The batching queue: batches by size and by wait, per-request and whole-batch errors, async, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError

import pytest

from lorafleet.errors import CapacityError, InvalidStateError, LorafleetError, NotFoundError, ValidationError
from lorafleet.serving import BatchingQueue, GenerationRequest, GenerationResult, ServingMetrics


class FakeEngine:
    """Echoes each prompt; user "ghost" fails alone, prompt "boom" fails the whole batch; ``hold`` pauses it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def generate_each(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | LorafleetError]:
        self.entered.set()
        assert self.hold.wait(timeout=10)
        self.batches.append([r.prompt for r in requests])
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("the model fell over")
        return [NotFoundError("no such user") if r.user == "ghost" else _result(r.prompt) for r in requests]


def _result(text: str) -> GenerationResult:
    return GenerationResult(text=text, token_ids=(1,), finish_reason="length", served_by=(), prompt_tokens=1)


def req(prompt: str, user: str = "u") -> GenerationRequest:
    return GenerationRequest(tenant_id=1, user=user, prompt=prompt)


def test_requests_are_collected_up_to_the_batch_size() -> None:
    engine = FakeEngine()
    engine.hold.clear()
    with BatchingQueue(engine, max_batch_size=3, max_wait_ms=50) as queue:
        futures = [queue.submit(req("p0"))]
        assert engine.entered.wait(timeout=10)  # p0 went alone after 50 ms; the engine is busy with it
        futures += [queue.submit(req(f"p{i}")) for i in range(1, 8)]
        engine.hold.set()
        assert [f.result(timeout=10).text for f in futures] == [f"p{i}" for i in range(8)]
    assert engine.batches == [["p0"], ["p1", "p2", "p3"], ["p4", "p5", "p6"], ["p7"]]


def test_a_batch_closes_after_max_wait() -> None:
    engine = FakeEngine()
    with BatchingQueue(engine, max_batch_size=32, max_wait_ms=30) as queue:
        start = time.monotonic()
        assert queue.submit(req("a")).result(timeout=10).text == "a"
        waited = time.monotonic() - start
    assert 0.025 <= waited < 5 and engine.batches == [["a"]]


def test_errors_reach_their_own_requests_and_the_worker_carries_on() -> None:
    engine = FakeEngine()
    engine.hold.clear()
    with BatchingQueue(engine, max_batch_size=8, max_wait_ms=50) as queue:
        ok, ghost = queue.submit(req("ok")), queue.submit(req("x", user="ghost"))
        engine.hold.set()
        assert ok.result(timeout=10).text == "ok"
        with pytest.raises(NotFoundError):
            ghost.result(timeout=10)
        doomed = [queue.submit(req("boom")), queue.submit(req("bystander"))]
        for future in doomed:
            with pytest.raises(RuntimeError, match="fell over"):
                future.result(timeout=10)
        assert queue.submit(req("after")).result(timeout=10).text == "after"


def test_invalid_requests_are_refused_before_queueing() -> None:
    with pytest.raises(ValidationError):
        req("")
    with pytest.raises(ValidationError):
        GenerationRequest(tenant_id=1, user="u", prompt="p", top_p=0.0)
    with pytest.raises(ValidationError):
        GenerationRequest(tenant_id=1, user="u", prompt="p", stop=("",))


def test_submit_async() -> None:
    engine = FakeEngine()
    with BatchingQueue(engine, max_wait_ms=5) as queue:

        async def main() -> list[str]:
            results = await asyncio.gather(*(queue.submit_async(req(f"a{i}")) for i in range(5)))
            return [r.text for r in results]

        assert asyncio.run(main()) == [f"a{i}" for i in range(5)]
    assert sum(len(b) for b in engine.batches) == 5


def test_close_serves_what_was_queued_then_refuses() -> None:
    engine = FakeEngine()
    engine.hold.clear()
    queue = BatchingQueue(engine, max_batch_size=2, max_wait_ms=0)
    futures = [queue.submit(req(f"q{i}")) for i in range(5)]
    closer = threading.Thread(target=queue.close)
    closer.start()
    while not queue.closed:
        time.sleep(0.001)
    with pytest.raises(InvalidStateError):
        queue.submit(req("late"))
    engine.hold.set()
    closer.join(timeout=10)
    assert [f.result(timeout=0).text for f in futures] == [f"q{i}" for i in range(5)]
    assert queue.closed


def test_close_can_cancel_pending_requests() -> None:
    engine = FakeEngine()
    engine.hold.clear()
    queue = BatchingQueue(engine, max_batch_size=1, max_wait_ms=0)
    running = queue.submit(req("running"))
    assert engine.entered.wait(timeout=10)
    pending = [queue.submit(req(f"p{i}")) for i in range(3)]
    closer = threading.Thread(target=lambda: queue.close(cancel_pending=True))
    closer.start()
    time.sleep(0.05)
    engine.hold.set()
    closer.join(timeout=10)
    assert running.result(timeout=0).text == "running"
    for future in pending:
        with pytest.raises(CancelledError):
            future.result(timeout=0)


def test_a_full_queue_pushes_back_and_cancelled_requests_are_skipped() -> None:
    engine = FakeEngine()
    engine.hold.clear()
    metrics = ServingMetrics()
    with BatchingQueue(engine, max_batch_size=1, max_wait_ms=0, max_pending=2, metrics=metrics) as queue:
        queue.submit(req("running"))
        assert engine.entered.wait(timeout=10)
        cancelled, kept = queue.submit(req("cancelled")), queue.submit(req("kept"))
        with pytest.raises(CapacityError):
            queue.submit(req("one too many"))
        assert cancelled.cancel()
        engine.hold.set()
        assert kept.result(timeout=10).text == "kept"
    assert engine.batches == [["running"], ["kept"]]
    assert metrics.snapshot()["queued"] == 2
