"""``BatchingQueue``: concurrent callers share one engine; a worker thread collects their requests into batches.

A batch closes when it holds ``max_batch_size`` requests or ``max_wait_ms`` after its first request arrived,
whichever is first. Each request gets a ``concurrent.futures.Future`` (or an awaitable via ``submit_async``)
that resolves to its own result or its own error; an error of the whole batch reaches every request in it, and
the worker carries on with the next batch. ``close`` stops accepting requests, serves (or cancels) those queued
and joins the worker.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lorafleet.domain.closing import ClosesOnExit
from lorafleet.errors import CapacityError, InvalidStateError, LorafleetError, ValidationError
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.requests import GenerationRequest, GenerationResult


class BatchRunner(Protocol):
    """What the queue needs of an engine (``GenerationEngine`` is one)."""

    def generate_each(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | LorafleetError]: ...


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[GenerationResult]
    enqueued_at: float


STOP = object()
P = TypeVar("P")


class RequestQueue(ClosesOnExit, Generic[P]):
    """The front both batchers share: a bounded queue of pending requests, closed once, with a stop marker put
    after every accepted request so that none is left behind. ``_threads`` are joined by ``close``."""

    def __init__(self, *, max_pending: int) -> None:
        self._queue: queue.Queue[P | object] = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._close_lock = threading.Lock()
        self._cancel_pending = False
        self._threads: list[threading.Thread] = []

    def _enqueue(self, pending: P) -> None:
        """Queue one pending request; ``InvalidStateError`` once closed, ``CapacityError`` when full."""
        with self._close_lock:
            if self._closed:
                raise InvalidStateError("the batcher is closed")
            try:
                self._queue.put_nowait(pending)
            except queue.Full:
                raise CapacityError(f"the batcher holds {self._queue.maxsize} requests already") from None

    def _fill(self, group: list[P], *, max_size: int, max_wait: float) -> tuple[list[P], bool]:
        """``group`` filled from the queue up to ``max_size``: blocking for a first request when it is empty,
        then waiting at most ``max_wait`` seconds for more; and whether the stop marker was reached."""
        deadline = None if not group else time.monotonic() + max_wait
        while len(group) < max_size:
            try:
                if deadline is None:
                    item = self._queue.get()
                    deadline = time.monotonic() + max_wait
                else:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is STOP:
                return group, True
            group.append(item)  # type: ignore[arg-type]  # anything but the marker is a pending request
        return group, False

    def close(self, *, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting requests; serve those queued (or cancel them) and, with ``wait``, join the threads."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._cancel_pending = cancel_pending
                self._queue.put(STOP)  # after every accepted request, so none is left behind
        if wait:
            for thread in self._threads:
                thread.join()

    @property
    def closed(self) -> bool:
        return self._closed


class BatchingQueue(RequestQueue[_Pending]):
    """Collects submitted requests into batches for one engine, on one worker thread (static batching: a batch
    decodes to its end before the next starts; ``ContinuousBatcher`` is what serves)."""

    def __init__(
        self,
        engine: BatchRunner,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 10.0,
        max_pending: int = 4096,
        metrics: ServingMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_pending < 1:
            raise ValidationError("max_batch_size and max_pending must be >= 1 and max_wait_ms >= 0")
        super().__init__(max_pending=max_pending)
        self.engine = engine
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.metrics = metrics or getattr(engine, "metrics", None) or ServingMetrics()
        self._threads = [threading.Thread(target=self._run, name="lorafleet-batcher", daemon=True)]
        self._threads[0].start()

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue a request; the future holds its result or its error. ``CapacityError`` when the queue is full."""
        future: Future[GenerationResult] = Future()
        self._enqueue(_Pending(request, future, time.monotonic()))
        return future

    async def submit_async(self, request: GenerationRequest) -> GenerationResult:
        """``await`` a request's result from an event loop (cancelling the await cancels a queued request)."""
        return await asyncio.wrap_future(self.submit(request))

    # --- the worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._collect()
            if self._cancel_pending:
                for pending in batch:
                    pending.future.cancel()
                continue
            self._serve(batch)

    def _collect(self) -> tuple[list[_Pending], bool]:
        """The next batch (blocks for its first request), and whether the stop marker was reached."""
        return self._fill([], max_size=self.max_batch_size, max_wait=self.max_wait)

    def _serve(self, batch: list[_Pending]) -> None:
        """Run a batch and settle every future; cancelled requests are skipped."""
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        now = time.monotonic()
        for pending in live:
            self.metrics.record_queue_wait(now - pending.enqueued_at)
        try:
            outcomes = self.engine.generate_each([p.request for p in live])
            if len(outcomes) != len(live):
                raise InvalidStateError(f"engine returned {len(outcomes)} outcomes for {len(live)} requests")
        except Exception as exc:  # the whole batch failed: every request gets the error
            for pending in live:
                pending.future.set_exception(exc)
            return
        for pending, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)


__all__ = ["BatchRunner", "BatchingQueue", "RequestQueue"]
