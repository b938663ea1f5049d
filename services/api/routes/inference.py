"""Generation through a user's experts: ``/v1/users/{user_id}/generate`` and the OpenAI-compatible
``/v1/completions`` and ``/v1/chat/completions``, where the body's ``user`` selects the bank and ``model`` what
serves it (``lorafleet.serving.requests.ModelRef``: the bank, ``base``, or one adapter, live or pinned), and
``GET /v1/models``.

Requests from every caller are batched together by the serving engine's queue. The gate picks and weights the
user's adapters per request; responses say which versions served them (``served_by``, and the ``lorafleet``
extension on OpenAI responses). A user the tenant does not have yet is served by the base model.

Rendering happens in the serving engine (``lorafleet.backbone.chat``; the API process may not hold a tokenizer
when serving runs on Ray Serve), exactly as training renders feedback: ``/v1/chat/completions`` passes its
messages through the backbone's chat template and stops at its end-of-turn token; ``/generate`` renders its
prompt as one user turn unless the body says ``raw``; ``/v1/completions`` (OpenAI's text completion) is raw.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from lorafleet.errors import LorafleetError
from lorafleet.routing.experts import served_task_models
from lorafleet.sdk import schemas as s
from lorafleet.serving.requests import (
    BANK_MODEL,
    BASE_MODEL,
    TASK_MODEL_PREFIX,
    GenerationDelta,
    GenerationRequest,
    GenerationResult,
)
from services.api import convert
from services.api.deps import CurrentTenant, Services, UserId
from services.api.errors import public_message
from services.api.runtime import ApiServices

router = APIRouter(tags=["inference"])
logger = logging.getLogger("lorafleet.api")
CHAT_MAX_TOKENS = 128
#: an OpenAI-style route's whole answer
Answer = TypeVar("Answer", s.CompletionResponse, s.ChatCompletionResponse)


@dataclass(frozen=True)
class _Input:
    """What one choice answers: a prompt (``raw``: without the chat template) or a conversation."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    raw: bool = False


def _requests(
    *,
    tenant_id: int,
    user: str | None,
    inputs: Sequence[_Input],
    max_tokens: int,
    sampling: s.GenerateRequest | s.CompletionRequest | s.ChatCompletionRequest,
    stop: tuple[str, ...],
    model: str = BANK_MODEL,
    n: int = 1,
    logprobs: int | None = None,
) -> list[GenerationRequest]:
    """``n`` requests per input, input-major (choice ``i * n + j`` is input ``i``'s ``j``-th); with a seed, choice
    ``j`` samples with ``seed + j`` so the choices differ and stay reproducible."""
    return [
        GenerationRequest(
            tenant_id=tenant_id,
            user=user,
            prompt=given.prompt,
            messages=given.messages,
            raw=given.raw,
            max_new_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=None if sampling.seed is None else (sampling.seed + j) % 2**63,
            stop=stop,
            model=model,
            adapter_scale=sampling.adapter_scale,
            logprobs=logprobs,
        )
        for given in inputs
        for j in range(n)
    ]


def _openai_requests(
    tenant_id: int,
    body: s.CompletionRequest | s.ChatCompletionRequest,
    inputs: Sequence[_Input],
    *,
    max_tokens: int,
    logprobs: int | None,
) -> list[GenerationRequest]:
    """The requests of an OpenAI-style body: its ``user`` selects the bank, and its sampling, stop strings,
    model and ``n`` choices per input apply to every input."""
    return _requests(
        tenant_id=tenant_id,
        user=body.user,
        inputs=inputs,
        max_tokens=max_tokens,
        sampling=body,
        stop=body.stop_strings(),
        model=body.model,
        n=body.n,
        logprobs=logprobs,
    )


@router.post("/v1/users/{user_id}/generate", response_model=s.GenerateResponse)
def generate(
    services: Services, tenant: CurrentTenant, user_id: UserId, body: s.GenerateRequest
) -> s.GenerateResponse:
    """Generate for the user (the prompt as one user turn of the chat template, or as is with ``raw``); the
    answer names the adapter versions and gate weights that served it."""
    (result,) = services.engine.generate(
        _requests(
            tenant_id=tenant.id,
            user=user_id,
            inputs=[_Input(prompt=body.prompt, raw=body.raw)],
            max_tokens=body.max_tokens,
            sampling=body,
            stop=tuple(body.stop),
        )
    )
    return convert.generated(result)


_STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or events with stream true."}}


@router.post("/v1/completions", response_model=s.CompletionResponse, responses=_STREAMED)  # type: ignore[arg-type]
async def completions(
    request: Request, services: Services, tenant: CurrentTenant, body: s.CompletionRequest
) -> s.CompletionResponse | StreamingResponse:
    """OpenAI's completions API (raw text, no chat template): ``user`` selects the bank; each prompt gets ``n``
    choices; ``echo`` puts the prompt before each completion; ``logprobs`` in the legacy format."""
    prompts = body.prompts()
    requests = _openai_requests(
        tenant.id,
        body,
        [_Input(prompt=prompt, raw=True) for prompt in prompts],
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
    )
    echoed = [prompts[i // body.n] if body.echo else "" for i in range(len(requests))]
    return await _answer(request, services, requests, _CompletionChunks(body, echoed))


@router.post("/v1/chat/completions", response_model=s.ChatCompletionResponse, responses=_STREAMED)  # type: ignore[arg-type]
async def chat_completions(
    request: Request, services: Services, tenant: CurrentTenant, body: s.ChatCompletionRequest
) -> s.ChatCompletionResponse | StreamingResponse:
    """OpenAI's chat completions API through the backbone's chat template; ``user`` selects the bank."""
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    messages = tuple((m.role, m.text()) for m in body.messages)
    requests = _openai_requests(
        tenant.id, body, [_Input(messages=messages)], max_tokens=max_tokens, logprobs=body.logprobs_wanted()
    )
    return await _answer(request, services, requests, _ChatChunks(body))


async def _answer(
    request: Request, services: ApiServices, requests: Sequence[GenerationRequest], chunks: _Chunks[Answer]
) -> Answer | StreamingResponse:
    """An OpenAI-style route's answer: streamed as ``chunks`` when the body asks, else the whole answer once
    every choice is generated."""
    if chunks.body.stream:
        return await _stream(request, services, requests, chunks, include_usage=chunks.body.include_usage())
    return chunks.whole(await run_in_threadpool(services.engine.generate, requests))


# --- streaming ------------------------------------------------------------------------------------------------
class _Chunks(Generic[Answer]):
    """How one route turns a choice's deltas and result into its chunks (JSON-ready dicts), or all the choices'
    results into its whole answer; subclasses name their chunk and answer models and id prefix and build the
    choices."""

    chunk_model: type[s.CompletionChunk] | type[s.ChatCompletionChunk]
    answer_model: type[Answer]
    id_prefix: str

    def __init__(self, body: s.CompletionRequest | s.ChatCompletionRequest) -> None:
        self.body = body
        self.id, self.created = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def chunk(self, choices: list[Any], **extra: Any) -> dict[str, Any]:
        made = self.chunk_model(
            id=self.id, created=self.created, model=self.body.model, choices=choices, **extra
        )
        return made.model_dump(mode="json", exclude_none=True)

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        raise NotImplementedError

    def done(self, index: int, result: GenerationResult) -> list[dict[str, Any]]:
        raise NotImplementedError

    def usage(self, results: Sequence[GenerationResult]) -> dict[str, Any]:
        """The last chunk with ``include_usage``: no choices, the usage of them all."""
        return self.chunk([], usage=convert.usage(results, n=self.body.n))

    def whole(self, results: Sequence[GenerationResult]) -> Answer:
        """The answer without streaming: every choice, the usage of them all and the versions that served them."""
        return self.answer_model(
            id=f"{self.id_prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.body.model,
            choices=[self.choice(i, r) for i, r in enumerate(results)],
            usage=convert.usage(results, n=self.body.n),
            lorafleet=self.served_by(results),
        )

    def choice(self, index: int, result: GenerationResult) -> Any:
        raise NotImplementedError

    def served_by(self, results: Sequence[GenerationResult]) -> Any:
        raise NotImplementedError


class _CompletionChunks(_Chunks[s.CompletionResponse]):
    chunk_model, answer_model, id_prefix = s.CompletionChunk, s.CompletionResponse, "cmpl"

    def __init__(self, body: s.CompletionRequest, echoed: Sequence[str]) -> None:
        super().__init__(body)
        self.logprobs, self.echoed = body.logprobs, echoed
        self.offsets = [len(e) for e in echoed]  # each choice's text so far (for ``text_offset``)

    def opening(self, index: int) -> list[dict[str, Any]]:
        echo = self.echoed[index]
        return [self.chunk([s.CompletionChunkChoice(index=index, text=echo)])] if echo else []

    def delta(self, index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        logprobs = None
        if self.logprobs is not None:
            logprobs = convert.completion_logprobs(delta.logprobs, offset=self.offsets[index])
        self.offsets[index] += len(delta.text)
        return [self.chunk([s.CompletionChunkChoice(index=index, text=delta.text, logprobs=logprobs)])]

    def done(self, index: int, result: GenerationResult) -> list[dict[str, Any]]:
        choice = s.CompletionChunkChoice(index=index, text="", finish_reason=result.finish_reason)
        return [self.chunk([choice], lorafleet=convert.serving_info(result))]

    def choice(self, index: int, result: GenerationResult) -> s.CompletionChoice:
        echo, logprobs = self.echoed[index], result.logprobs
        return s.CompletionChoice(
            index=index,
            text=echo + result.text,
            finish_reason=result.finish_reason,
            logprobs=None if logprobs is None else convert.completion_logprobs(logprobs, offset=len(echo)),
        )

    def served_by(self, results: Sequence[GenerationResult]) -> list[s.ServingInfo]:
        return [convert.serving_info(r) for r in results]


class _ChatChunks(_Chunks[s.ChatCompletionResponse]):
    chunk_model, answer_model, id_prefix = s.ChatCompletionChunk, s.ChatCompletionResponse, "chatcmpl"

    def __init__(self, body: s.ChatCompletionRequest) -> None:
        super().__init__(body)
        self.logprobs = bool(body.logprobs)
        self.started: set[int] = (
            set()
        )  # choices whose content has begun (leading whitespace is dropped before)

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [self.chunk([s.ChatChunkChoice(index=index, delta=s.ChatDelta(role="assistant", content=""))])]

    def delta(self, index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        text = delta.text
        if index not in self.started:  # as the whole answer is stripped, the stream drops leading whitespace
            text = text.lstrip()
            if text:
                self.started.add(index)
        logprobs = convert.chat_logprobs(delta.logprobs) if self.logprobs else None
        if not text and logprobs is None:
            return []
        choice = s.ChatChunkChoice(index=index, delta=s.ChatDelta(content=text), logprobs=logprobs)
        return [self.chunk([choice])]

    def done(self, index: int, result: GenerationResult) -> list[dict[str, Any]]:
        choice = s.ChatChunkChoice(index=index, delta=s.ChatDelta(), finish_reason=result.finish_reason)
        return [self.chunk([choice], lorafleet=convert.serving_info(result))]

    def choice(self, index: int, result: GenerationResult) -> s.ChatChoice:
        logprobs = None if result.logprobs is None else convert.chat_logprobs(result.logprobs)
        message = s.AssistantMessage(content=result.text.strip())
        return s.ChatChoice(
            index=index, message=message, finish_reason=result.finish_reason, logprobs=logprobs
        )

    def served_by(self, results: Sequence[GenerationResult]) -> s.ServingInfo:
        return convert.serving_info(results[0])  # the choices share a prompt, so the gate routed them alike


_END = object()


async def _stream(
    request: Request,
    services: ApiServices,
    requests: Sequence[GenerationRequest],
    chunks: _Chunks[Any],
    *,
    include_usage: bool,
) -> StreamingResponse:
    """Server-sent events of every choice, interleaved as they are decoded, then (``include_usage``) the usage
    chunk and ``[DONE]``. Every choice is started and its first item awaited before the response begins, so a
    request that cannot be served (an unknown model, a prompt too long) is a 4xx as without streaming; an error
    after that is sent as an ``error`` event and ends the stream. A client that disconnects cancels the
    choices (their rows leave the batch at the next step)."""
    events = _merged([services.engine.stream_async(r) for r in requests])
    first: list[tuple[int, object]] = []
    seen: set[int] = set()
    try:
        while len(seen) < len(requests):
            index, item = await anext(events)
            if isinstance(item, BaseException):
                raise item
            first.append((index, item))
            seen.add(index)
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        results: dict[int, GenerationResult] = {}
        try:
            for index in range(len(requests)):
                for chunk in chunks.opening(index):
                    yield _sse(chunk)
            async for index, item in _chain(first, events):
                if isinstance(item, BaseException):
                    yield _sse({"error": _error_body(request, item)})
                    return
                if isinstance(item, GenerationDelta):
                    for chunk in chunks.delta(index, item):
                        yield _sse(chunk)
                elif isinstance(item, GenerationResult):
                    results[index] = item
                    for chunk in chunks.done(index, item):
                        yield _sse(chunk)
            if include_usage:
                yield _sse(chunks.usage([results[i] for i in range(len(requests))]))
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _merged(streams: Sequence[AsyncIterator[object]]) -> AsyncGenerator[tuple[int, object]]:
    """``(index, item)`` of several streams as they come; a stream's error is an item; closing this cancels all."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[object]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as exc:  # the stream's own error, delivered in order
            await queue.put((index, exc))
        finally:
            await queue.put((index, _END))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _chain(
    first: Sequence[tuple[int, object]], rest: AsyncIterator[tuple[int, object]]
) -> AsyncIterator[tuple[int, object]]:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _error_body(request: Request, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, LorafleetError):  # as an error answer would say it: ids and reasons, no server paths
        return {"code": exc.code, "message": public_message(request, exc)}
    logger.error("a streamed generation failed", exc_info=exc)
    return {"code": "internal_error", "message": "generation failed"}


@router.get("/v1/models", response_model=s.ModelList)
def list_models(services: Services, tenant: CurrentTenant) -> s.ModelList:
    """OpenAI's model list: ``lorafleet`` (each request's user's experts), ``base`` and the tenant's task
    adapters with a live version (``task:<name>``). A user's adapter (``<user>/<adapter>[@<n>]``) and pinned
    versions are served too but not listed: there is one per user and version."""
    created = int(time.time())
    data = [
        s.ModelOut(
            id=BANK_MODEL,
            created=created,
            owned_by="lorafleet",
            description="The request's user's experts, gated per request (the base model without a user).",
        ),
        s.ModelOut(id=BASE_MODEL, created=created, owned_by="lorafleet", description="The base model alone."),
    ]
    for name in served_task_models(services.db, tenant_id=tenant.id):
        data.append(
            s.ModelOut(
                id=f"{TASK_MODEL_PREFIX}{name}",
                created=created,
                owned_by=f"tenant {tenant.id}",
                description=f"The task adapter {name!r} alone, at its live version (add '@<n>' to pin one).",
            )
        )
    return s.ModelList(data=data)
