"""``ContinuousBatcher``: concurrent callers share one engine, and a request joins the running batch at the next
decoding step instead of waiting for the batch before it to finish (continuous batching, as vLLM, TGI and LoRAX
do), and leaves it as soon as it is done.

Two threads, so that slow admission work never stalls the rows that are decoding:

- **admission** takes submitted requests off the queue (a group of up to ``max_batch_size``, closed
  ``max_wait_ms`` after its first request) and ``engine.admit``-s them: rendering, the user's experts, the gate, and
  each row's adapter slots, loaded from the object store if needed and pinned *per row*. A request that fails
  here (unknown model, prompt too long, a corrupted blob) is settled at once. A request that finds every slot
  pinned by running rows waits for a row to finish and is tried again; with nothing running it fails with
  ``CapacityError``.
- **decode** drives one ``DecodeBatch``. Before each step it drops the rows whose caller went away (a cancelled
  future: an HTTP client that disconnected), and lets admitted rows join: at most ``max_batch_size`` rows run at
  once, and the newcomers' prefill is bounded by ``max_prefill_tokens`` (padded prompt tokens, at least one row)
  so the running rows keep flowing. Newcomers join an empty batch at once. Where the model allows it
  (``DecodeBatch.fuses_joins``: Llama-architecture backbones) they join a running one at the next step, inside
  that step's forward (``serving/fused.py``). Elsewhere a join is a prefill forward that the running rows wait
  for, so newcomers join in groups (when they are ``join_ratio`` of its rows, or after
  ``max_join_delay_steps`` steps). Each step streams every streaming row's new text (``GenerationDelta``) and
  settles the rows that ended; a row's pins are released the moment it ends.

A request gets a ``concurrent.futures.Future`` (``submit``), an awaitable (``submit_async``), or a stream of
deltas (``stream`` / ``stream_async``) whose last item is the ``GenerationResult``. Failures are per request,
as in the engine; an unexpected error of a whole step fails the rows running then, and the batcher carries on.
``close`` stops accepting requests, serves (or cancels) those queued and joins both threads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import InvalidStateError as FutureStateError
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from lorafleet.errors import CapacityError, LorafleetError, ValidationError
from lorafleet.serving.batcher import RequestQueue
from lorafleet.serving.decode import DecodeBatch, RowUpdate
from lorafleet.serving.metrics import BatchRecord, ServingMetrics
from lorafleet.serving.options import BatchingOptions
from lorafleet.serving.requests import GenerationDelta, GenerationRequest, GenerationResult, TokenLogprob

if TYPE_CHECKING:
    from lorafleet.serving.engine import Admitted, GenerationEngine

logger = logging.getLogger(__name__)
OnDelta = Callable[[GenerationDelta], object]
#: how long admission waits for a running row to free a slot before trying a deferred request again
_DEFERRED_RETRY_S = 0.05
#: newcomers join a running batch once they are this fraction of its rows, or have waited this many steps
DEFAULT_JOIN_RATIO = 0.5
DEFAULT_MAX_JOIN_DELAY_STEPS = 4


@dataclass(eq=False)
class _Pending:
    request: GenerationRequest
    future: Future[GenerationResult]
    enqueued_at: float
    on_delta: OnDelta | None = None
    admitted: Admitted | None = None
    #: the decode step count when the request was admitted (how long it has waited to join)
    ready_step: int = 0
    #: tokens (and their log probabilities) taken since the last delta was sent
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ContinuousBatcher(RequestQueue["_Pending"]):
    """Continuous batching of many callers' requests through one ``GenerationEngine`` (module docstring)."""

    def __init__(
        self,
        engine: GenerationEngine,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_prefill_tokens: int = 2048,
        join_ratio: float | None = None,
        max_join_delay_steps: int = DEFAULT_MAX_JOIN_DELAY_STEPS,
        max_pending: int = 4096,
        metrics: ServingMetrics | None = None,
        fuse_joins: bool = True,
    ) -> None:
        """``join_ratio`` and ``max_join_delay_steps``: when admitted requests join a running batch (see
        ``_take_ready``); ``join_ratio=0`` joins at every step. None: at every step where the engine's decode
        batch joins within the step's own forward (``DecodeBatch.fuses_joins``), else ``DEFAULT_JOIN_RATIO``.
        ``fuse_joins`` False: every join is a forward of its own (for comparison)."""
        if max_batch_size < 1 or max_wait_ms < 0 or max_pending < 1 or max_prefill_tokens < 1:
            raise ValidationError(
                "max_batch_size, max_pending and max_prefill_tokens must be >= 1 and max_wait_ms >= 0"
            )
        if join_ratio is None:
            join_ratio = 0.0 if engine.decode_batch(fuse_joins=fuse_joins).fuses_joins else DEFAULT_JOIN_RATIO
        if join_ratio < 0 or max_join_delay_steps < 0:
            raise ValidationError("join_ratio and max_join_delay_steps must be >= 0")
        self.join_ratio, self.max_join_delay_steps = join_ratio, max_join_delay_steps
        self.fuse_joins = fuse_joins
        super().__init__(max_pending=max_pending)
        self.engine = engine
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics or engine.metrics
        # shared by the two threads: admitted rows waiting to join, and whether admission has stopped
        self._cond = threading.Condition()
        self._ready: deque[_Pending] = deque()
        self._running = 0
        self._finished = 0  # rows ended so far (admission retries deferred requests when it moves)
        self._steps = 0  # decoding steps so far
        self._admission_done = False
        self._threads = [  # ``close`` joins them in this order
            threading.Thread(target=self._admit_loop, name="lorafleet-admission", daemon=True),
            threading.Thread(target=self._decode_loop, name="lorafleet-decode", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def from_options(cls, engine: GenerationEngine, options: BatchingOptions) -> ContinuousBatcher:
        """The batcher a service runs over ``engine``, batching as ``options`` say (each ``BatchingOptions`` field
        is the keyword argument of the same name; a subclass's own fields are not passed)."""
        return cls(engine, **{f.name: getattr(options, f.name) for f in fields(BatchingOptions)})

    # --- submitting ------------------------------------------------------------------------------------------
    def submit(
        self, request: GenerationRequest, *, on_delta: OnDelta | None = None
    ) -> Future[GenerationResult]:
        """Queue a request; the future holds its result or its error (cancel it to stop the request, queued or
        running). ``on_delta`` is called from the decode thread with each piece of new text, in order, before
        the future is settled. ``CapacityError`` when the queue is full."""
        future: Future[GenerationResult] = Future()
        self._enqueue(_Pending(request, future, time.monotonic(), on_delta))
        return future

    async def submit_async(self, request: GenerationRequest) -> GenerationResult:
        """``await`` a request's result (cancelling the await cancels the request, queued or running)."""
        return await asyncio.wrap_future(self.submit(request))

    def stream(self, request: GenerationRequest) -> Iterator[GenerationDelta | GenerationResult]:
        """The request's deltas as they are decoded, then its ``GenerationResult``; its error is raised. Closing
        the iterator early cancels the request."""
        items: queue.SimpleQueue[GenerationDelta | None] = queue.SimpleQueue()
        future = self.submit(request, on_delta=items.put)
        future.add_done_callback(lambda _: items.put(None))
        try:
            while (item := items.get()) is not None:
                yield item
            yield future.result()
        finally:
            future.cancel()

    async def stream_async(
        self, request: GenerationRequest
    ) -> AsyncIterator[GenerationDelta | GenerationResult]:
        """``stream`` for an event loop: ``async for`` the deltas, then the result. Leaving the loop early, or
        the task being cancelled (a client that disconnected), cancels the request."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[GenerationDelta | None] = asyncio.Queue()
        future = self.submit(request, on_delta=lambda d: loop.call_soon_threadsafe(items.put_nowait, d))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(items.put_nowait, None))
        try:
            while (item := await items.get()) is not None:
                yield item
            yield future.result()
        finally:
            future.cancel()

    def occupancy(self) -> dict[str, int]:
        """Requests ``queued`` (not yet admitted), ``ready`` (admitted, waiting to join) and ``running``."""
        with self._cond:
            return {"queued": self._queue.qsize(), "ready": len(self._ready), "running": self._running}

    # --- admission -------------------------------------------------------------------------------------------
    def _admit_loop(self) -> None:
        deferred: list[_Pending] = []
        try:
            stopping = False
            while not (stopping and not deferred):
                group, stopped = self._collect(deferred, stopping)
                stopping = stopping or stopped
                deferred = []
                if self._cancel_pending:
                    for pending in group:
                        pending.future.cancel()
                    continue
                deferred = self._admit([p for p in group if not p.future.cancelled()])
        finally:
            with self._cond:
                self._admission_done = True
                self._cond.notify_all()

    def _collect(self, deferred: list[_Pending], stopping: bool) -> tuple[list[_Pending], bool]:
        """The next group: deferred requests (once a row has finished, or after a short wait) and new arrivals
        (blocking for the first when there is nothing else to do); and whether the stop marker was reached."""
        group = list(deferred)
        if deferred:
            with self._cond:
                seen = self._finished
                self._cond.wait_for(lambda: self._finished != seen, timeout=_DEFERRED_RETRY_S)
        if stopping:
            return group, True
        return self._fill(group, max_size=self.max_batch_size, max_wait=self.max_wait)

    def _admit(self, group: list[_Pending]) -> list[_Pending]:
        """Admit a group; failures are settled, admitted rows go to the decode thread. Returns the requests that
        found no free slot while rows are running (they wait for one to finish)."""
        if not group:
            return []
        started = time.perf_counter()
        now = time.monotonic()
        try:
            outcomes = self.engine.admit(
                [p.request for p in group], stream=[p.on_delta is not None for p in group]
            )
        except Exception as exc:  # an unexpected error of the whole group: each request gets it
            logger.exception("admitting %d requests failed", len(group))
            for pending in group:
                _settle(pending.future, exc)
            return []
        deferred, ready, failed = [], [], []
        for pending, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, CapacityError) and self._busy():
                deferred.append(pending)
            elif isinstance(outcome, LorafleetError):
                failed.append(outcome)
                _settle(pending.future, outcome)
            else:
                pending.admitted = outcome
                ready.append(pending)
                self.metrics.record_queue_wait(now - pending.enqueued_at)
        self.metrics.record_batch(
            BatchRecord(
                size=len(group) - len(deferred),
                failed_codes=tuple(e.code for e in failed),
                base_rows=sum(1 for p in ready if p.admitted is not None and not p.admitted.spec.routes),
                adapter_rows=sum(1 for p in ready if p.admitted is not None and p.admitted.spec.routes),
                prompt_tokens=sum(len(p.admitted.spec.prompt_ids) for p in ready if p.admitted is not None),
                completion_tokens=0,  # counted as rows finish (``record_row``)
                seconds=time.perf_counter() - started,
            )
        )
        if ready:
            with self._cond:
                for pending in ready:
                    pending.ready_step = self._steps
                self._ready.extend(ready)
                self._cond.notify_all()
        return deferred

    def _busy(self) -> bool:
        with self._cond:
            return self._running > 0 or bool(self._ready)

    # --- decoding --------------------------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        batch = self.engine.decode_batch(fuse_joins=self.fuse_joins)
        running: dict[int, _Pending] = {}
        while True:
            with self._cond:
                self._cond.wait_for(lambda: running or self._ready or self._admission_done)
                if not running and not self._ready and self._admission_done:
                    return
                newcomers = self._take_ready(len(running))
            self._drop_cancelled(batch, running)
            newcomers = [p for p in newcomers if not self._released_if_cancelled(p)]
            started = time.perf_counter()
            try:
                updates: list[RowUpdate] = []
                with self.engine.model_lock:  # streaming and settling happen after it is released
                    running.update((id(p), p) for p in newcomers)
                    rows = len(batch) + len(newcomers)
                    updates += batch.join_and_step([(id(p), _admitted(p).spec) for p in newcomers])
                if rows:
                    self.metrics.record_step(rows, time.perf_counter() - started)
                self._dispatch(updates, running)
            except Exception as exc:  # a whole step failed: the rows running now get the error
                logger.exception("a decoding step of %d rows failed", len(running))
                for pending in running.values():
                    _admitted(pending).release()
                    _settle(pending.future, exc)
                self._ended(len(running))
                running.clear()
                batch = self.engine.decode_batch(fuse_joins=self.fuse_joins)
            with self._cond:
                self._running = len(running)
                self._steps += 1

    def _take_ready(self, running: int) -> list[_Pending]:
        """Admitted rows that may join now (under ``_cond``). Into an empty batch, at once. Into a running one,
        when enough are waiting (``join_ratio`` of the running rows) or the oldest has waited
        ``max_join_delay_steps`` steps. Without fused joins, each join is a prefill forward of its own that the
        running rows wait for, and where a forward costs about the same whatever its size (a 4-bit backbone on
        CPU dequantises every weight per forward) joining one newcomer per step would halve their pace; TGI's
        router waits the same way (``waiting_served_ratio``, ``max_waiting_tokens``). With fused joins the
        default ``join_ratio`` is 0: every step takes whoever is ready. Then as many as fit: room in the batch, and their
        padded prefill within ``max_prefill_tokens`` (the first one always, so a long prompt is never starved)."""
        if not self._ready:
            return []
        waited = self._steps - self._ready[0].ready_step
        if running and len(self._ready) < self.join_ratio * running and waited < self.max_join_delay_steps:
            return []
        taken: list[_Pending] = []
        longest = 0
        while self._ready and running + len(taken) < self.max_batch_size:
            length = len(_admitted(self._ready[0]).spec.prompt_ids)
            if taken and max(longest, length) * (len(taken) + 1) > self.max_prefill_tokens:
                break
            longest = max(longest, length)
            taken.append(self._ready.popleft())
        return taken

    def _drop_cancelled(self, batch: DecodeBatch, running: dict[int, _Pending]) -> None:
        gone = [key for key, p in running.items() if p.future.cancelled()]
        if gone:
            batch.drop(gone)
            for key in gone:
                _admitted(running.pop(key)).release()
            self.metrics.record_cancelled(len(gone))
            self._ended(len(gone))

    def _released_if_cancelled(self, pending: _Pending) -> bool:
        if pending.future.cancelled():
            _admitted(pending).release()
            self.metrics.record_cancelled(1)
            return True
        return False

    def _dispatch(self, updates: Sequence[RowUpdate], running: dict[int, _Pending]) -> None:
        """Stream each row's new text; settle the rows that ended."""
        ended = 0
        for update in updates:
            pending = running[int(update.key)]  # type: ignore[call-overload]
            if pending.on_delta is not None:
                self._stream(pending, update)
            if update.output is None:
                continue
            del running[int(update.key)]  # type: ignore[call-overload]
            outcome: GenerationResult | BaseException
            try:
                outcome = self.engine.finish(_admitted(pending), update.output)
            except Exception as exc:  # building this row's result failed: it alone gets the error
                logger.exception("finishing a row failed")
                _admitted(pending).release()
                outcome = exc
            failed = None
            if isinstance(outcome, BaseException):
                failed = outcome.code if isinstance(outcome, LorafleetError) else "internal_error"
            self.metrics.record_row(completion_tokens=len(update.output.token_ids), failed_code=failed)
            _settle(pending.future, outcome)
            ended += 1
        if ended:
            self._ended(ended)

    @staticmethod
    def _stream(pending: _Pending, update: RowUpdate) -> None:
        if update.token_id is not None:
            pending.tokens.append(update.token_id)
        if update.logprob is not None:
            pending.logprobs.append(update.logprob)
        if not update.delta and not (update.done and pending.tokens):
            return
        delta = GenerationDelta(update.delta, tuple(pending.tokens), tuple(pending.logprobs))
        pending.tokens, pending.logprobs = [], []
        try:
            assert pending.on_delta is not None
            pending.on_delta(delta)
        except Exception:  # a consumer's error never stops the batch
            logger.exception("a stream consumer failed; the request is cancelled")
            pending.future.cancel()

    def _ended(self, n: int) -> None:
        with self._cond:
            self._finished += n
            self._cond.notify_all()


def _admitted(pending: _Pending) -> Admitted:
    assert pending.admitted is not None
    return pending.admitted


def _settle(future: Future[GenerationResult], outcome: GenerationResult | BaseException) -> None:
    """Set a future's result or exception, unless its caller cancelled it meanwhile."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except FutureStateError:
        pass  # cancelled by its caller


__all__ = ["ContinuousBatcher", "OnDelta"]
