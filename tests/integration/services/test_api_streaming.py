"""Streaming and the rest of the OpenAI surface through a real server: server-sent events read by the official
``openai`` client (sync and async) and by the SDK, concatenating to the non-streamed answer, with a final usage
chunk and the versions that served each choice; ``n`` choices, ``logprobs``, ``echo``; a stream that cannot be
served is a 4xx before it starts; a client that disconnects frees its row at the next step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import ApiServer, Library, TenantHandle, live_personal_version
from services.api.runtime import ApiServices
from tests.polling import wait_for

from lorafleet.sdk import AsyncClient, errors

PROMPT = "The weather today is"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
def olga(
    make_tenant: Callable[[], TenantHandle], library: Library, adapter_folder: Callable[[int], Path]
) -> TenantHandle:
    tenant = make_tenant()
    live_personal_version(library, tenant_id=tenant.id, user="olga", folder=adapter_folder(2))
    return tenant


def test_streamed_answers_equal_the_whole_answer_through_the_openai_client(
    api: ApiServer, olga: TenantHandle
) -> None:
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=olga.api_key, max_retries=0)
    whole = client.chat.completions.create(
        model="lorafleet",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        user="olga",  # type: ignore[arg-type]
    )
    chunks = list(
        client.chat.completions.create(
            model="lorafleet",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            user="olga",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces).rstrip() == whole.choices[0].message.content
    last_choice = [c for c in chunks if c.choices][-1]
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert (last_choice.model_extra or {})["lorafleet"]["versions"] == {"personal": 1}
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage == whole.usage

    without_usage = list(
        client.completions.create(
            model="lorafleet", prompt=PROMPT, max_tokens=8, temperature=0, user="olga", stream=True, echo=True
        )
    )
    text = "".join(c.choices[0].text for c in without_usage)
    plain = client.completions.create(
        model="lorafleet", prompt=PROMPT, max_tokens=8, temperature=0, user="olga"
    )
    assert text == PROMPT + plain.choices[0].text and all(c.usage is None for c in without_usage)

    async def read_async() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key=olga.api_key, max_retries=0)
        stream = await aclient.completions.create(
            model="lorafleet", prompt=PROMPT, max_tokens=8, temperature=0, user="olga", stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    assert asyncio.run(read_async()) == plain.choices[0].text


def test_the_sdk_streams_sync_and_async(api: ApiServer, olga: TenantHandle) -> None:
    whole = olga.client.complete("olga", PROMPT, max_tokens=8, temperature=0)
    chunks = list(olga.client.stream_complete("olga", PROMPT, max_tokens=8, temperature=0))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage

    async def read() -> str:
        async with AsyncClient(api.url, olga.api_key) as client:
            pieces = [c async for c in client.stream_chat("olga", MESSAGES, max_tokens=8, temperature=0)]
        return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)

    assert (
        asyncio.run(read()).rstrip()
        == olga.client.chat("olga", MESSAGES, max_tokens=8, temperature=0).choices[0].message.content
    )
    with pytest.raises(errors.NotFound):  # refused before the stream starts: a 404, not an event
        list(olga.client.stream_complete("olga", PROMPT, model="nobody/personal"))


def test_n_choices_logprobs_and_echo(api: ApiServer, olga: TenantHandle) -> None:
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=olga.api_key, max_retries=0)
    sampled = client.completions.create(
        model="lorafleet", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3, user="olga"
    )
    again = client.completions.create(
        model="lorafleet", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3, user="olga"
    )
    texts = [c.text for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.text for c in again.choices]  # seeded: choice i samples with seed + i
    one = client.completions.create(model="lorafleet", prompt=PROMPT, max_tokens=1, user="olga")
    assert sampled.usage is not None and one.usage is not None
    assert sampled.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once

    scored = client.completions.create(
        model="lorafleet", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, user="olga"
    )
    (choice,) = scored.choices
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens).startswith(choice.text) or choice.finish_reason == "stop"
    assert choice.logprobs.token_logprobs is not None and all(
        lp <= 0 for lp in choice.logprobs.token_logprobs
    )
    assert choice.logprobs.top_logprobs is not None and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    for token, logprob, top in zip(
        choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True
    ):
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5) and token in top  # greedy: the top one

    chat = client.chat.completions.create(
        model="lorafleet",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        user="olga",  # type: ignore[arg-type]
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in content)

    echoed = client.completions.create(
        model="lorafleet", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, user="olga"
    )
    plain = client.completions.create(
        model="lorafleet", prompt=PROMPT, max_tokens=4, temperature=0, user="olga"
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text

    answer = httpx.post(
        f"{api.url}/v1/chat/completions",
        json={"messages": MESSAGES, "response_format": {"type": "json_object"}},
        headers={"Authorization": f"Bearer {olga.api_key}"},
    )
    assert answer.status_code == 422 and "constrain decoding" in answer.json()["error"]["message"]


def test_a_client_that_disconnects_frees_its_row(api: ApiServer, olga: TenantHandle) -> None:
    services: ApiServices = api.server.config.app.state.services  # type: ignore[attr-defined]
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "user": "olga", "stream": True}
    headers = {"Authorization": f"Bearer {olga.api_key}"}
    cancelled = _cancelled(services)
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{api.url}/v1/completions", json=body, headers=headers) as answer,
    ):
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # decoding has started
        assert services.engine.occupancy()["running"] >= 1  # type: ignore[union-attr]
    # the connection is closed: the row leaves the batch at its next step, long before its 400 tokens
    wait_for(
        "the abandoned row to leave the batch",
        lambda: not services.engine.occupancy()["running"],  # type: ignore[union-attr]
        timeout=60,
        every=0.02,
    )
    assert _cancelled(services) == cancelled + 1  # it was dropped, it did not run to its end
    after = olga.client.complete("olga", PROMPT, max_tokens=3, temperature=0)
    assert after.usage.completion_tokens <= 3


def _cancelled(services: ApiServices) -> int:
    (line,) = [
        line
        for line in services.engine.metrics_text().splitlines()
        if line.startswith("lorafleet_serving_requests_cancelled_total ")
    ]
    return int(line.split()[-1])
