"""Generation through a user's adapter bank: ``/v1/users/{user_id}/generate`` and the OpenAI-compatible
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

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import APIRouter

from lorafleet.routing.bank import served_task_models
from lorafleet.sdk import schemas as s
from lorafleet.serving.requests import (
    BANK_MODEL,
    BASE_MODEL,
    TASK_MODEL_PREFIX,
    GenerationRequest,
    GenerationResult,
)
from services.api import convert
from services.api.deps import CurrentTenant, Services, UserId
from services.api.runtime import ApiServices

router = APIRouter(tags=["inference"])
CHAT_MAX_TOKENS = 128


@dataclass(frozen=True)
class _Input:
    """What one choice answers: a prompt (``raw``: without the chat template) or a conversation."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    raw: bool = False


def _serve(
    services: ApiServices,
    *,
    tenant_id: int,
    user: str | None,
    inputs: Sequence[_Input],
    max_tokens: int,
    sampling: s.GenerateRequest | s.CompletionRequest | s.ChatCompletionRequest,
    stop: tuple[str, ...],
    model: str = BANK_MODEL,
) -> list[GenerationResult]:
    requests = [
        GenerationRequest(
            tenant_id=tenant_id,
            user=user,
            prompt=given.prompt,
            messages=given.messages,
            raw=given.raw,
            max_new_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=stop,
            model=model,
            adapter_scale=sampling.adapter_scale,
        )
        for given in inputs
    ]
    return services.engine.generate(requests)


@router.post("/v1/users/{user_id}/generate", response_model=s.GenerateResponse)
def generate(
    services: Services, tenant: CurrentTenant, user_id: UserId, body: s.GenerateRequest
) -> s.GenerateResponse:
    """Generate for the user (the prompt as one user turn of the chat template, or as is with ``raw``); the
    answer names the adapter versions and gate weights that served it."""
    (result,) = _serve(
        services,
        tenant_id=tenant.id,
        user=user_id,
        inputs=[_Input(prompt=body.prompt, raw=body.raw)],
        max_tokens=body.max_tokens,
        sampling=body,
        stop=tuple(body.stop),
    )
    return convert.generated(result)


@router.post("/v1/completions", response_model=s.CompletionResponse)
def completions(services: Services, tenant: CurrentTenant, body: s.CompletionRequest) -> s.CompletionResponse:
    """OpenAI's completions API (raw text, no chat template): ``user`` selects the bank; several prompts give
    one choice each."""
    results = _serve(
        services,
        tenant_id=tenant.id,
        user=body.user,
        inputs=[_Input(prompt=prompt, raw=True) for prompt in body.prompts()],
        max_tokens=body.max_tokens,
        sampling=body,
        stop=body.stop_strings(),
        model=body.model,
    )
    return s.CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        choices=[
            s.CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ],
        usage=convert.usage(results),
        lorafleet=[convert.serving_info(r) for r in results],
    )


@router.post("/v1/chat/completions", response_model=s.ChatCompletionResponse)
def chat_completions(
    services: Services, tenant: CurrentTenant, body: s.ChatCompletionRequest
) -> s.ChatCompletionResponse:
    """OpenAI's chat completions API through the backbone's chat template; ``user`` selects the bank."""
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    messages = tuple((m.role, m.text()) for m in body.messages)
    (result,) = _serve(
        services,
        tenant_id=tenant.id,
        user=body.user,
        inputs=[_Input(messages=messages)],
        max_tokens=max_tokens,
        sampling=body,
        stop=body.stop_strings(),
        model=body.model,
    )
    return s.ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        choices=[
            s.ChatChoice(
                index=0,
                message=s.AssistantMessage(content=result.text.strip()),
                finish_reason=result.finish_reason,
            )
        ],
        usage=convert.usage([result]),
        lorafleet=convert.serving_info(result),
    )


@router.get("/v1/models", response_model=s.ModelList)
def list_models(services: Services, tenant: CurrentTenant) -> s.ModelList:
    """OpenAI's model list: ``lorafleet`` (each request's user's adapter bank), ``base`` and the tenant's task
    adapters with a live version (``task:<name>``). A user's adapter (``<user>/<adapter>[@<n>]``) and pinned
    versions are served too but not listed: there is one per user and version."""
    created = int(time.time())
    data = [
        s.ModelOut(
            id=BANK_MODEL,
            created=created,
            owned_by="lorafleet",
            description="The request's user's adapter bank, gated per request (the base model without a user).",
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
