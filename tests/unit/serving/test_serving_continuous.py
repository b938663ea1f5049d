"""Continuous batching on the real tiny engine: rows that join a running batch decode exactly what they would
alone, a short request overtakes a long one, streamed deltas concatenate to the answer and never show a stop
string, a cancelled row leaves at the next step and frees its slots, a request that finds every slot pinned
waits for one, log probabilities match the logits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_world import PROMPTS, Setup, assert_same, request
from serving_helpers import FolderFetcher, gates_by_user, member, user_bank, zero_embed
from tests.polling import wait_for

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.errors import NotFoundError
from lorafleet.routing.experts import ExpertSet
from lorafleet.serving import (
    AdapterCache,
    ContinuousBatcher,
    GenerationDelta,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
)

LONG = 40


class Gate:
    """Pauses the decode thread inside a streaming callback until the test lets it go."""

    def __init__(self, after_tokens: int) -> None:
        self.after, self.seen = after_tokens, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, delta: GenerationDelta) -> None:
        self.seen += len(delta.token_ids)
        if self.seen >= self.after and not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(timeout=30)


def long_request(**kwargs: object) -> GenerationRequest:
    fields: dict[str, object] = {"prompt": PROMPTS["carol"], "max_new_tokens": LONG, "return_logits": True}
    fields.update(kwargs)
    return request("bob", **fields)


def test_rows_that_join_a_running_batch_decode_what_they_would_alone(setup: Setup) -> None:
    gate = Gate(after_tokens=3)
    with ContinuousBatcher(setup.engine, max_batch_size=8) as batcher:
        first = batcher.submit(long_request(), on_delta=gate)
        assert gate.reached.wait(timeout=60)  # the long row is decoding; the decode thread is paused
        joiners = [request(u) for u in PROMPTS] + [
            request("alice", prompt=PROMPTS["carol"], max_new_tokens=5)
        ]
        futures = [batcher.submit(r) for r in joiners]
        gate.release.set()
        results = [f.result(timeout=120) for f in futures]
        long_result = first.result(timeout=120)
    for req, result in zip([long_request(), *joiners], [long_result, *results], strict=True):
        (alone,) = setup.engine.generate([req])
        assert_same(result, alone)
    snapshot = setup.engine.metrics.snapshot()
    assert (
        snapshot["decode_steps"] > 0 and snapshot["decode_step_rows"] > snapshot["decode_steps"]
    )  # shared steps


def finish_order(setup: Setup, **knobs: float) -> list[str]:
    """Which of a long request and a short one (arriving once the long one decodes) finishes first."""
    gate = Gate(after_tokens=2)
    done: list[str] = []
    with ContinuousBatcher(setup.engine, max_batch_size=8, **knobs) as batcher:  # type: ignore[arg-type]
        long = batcher.submit(long_request(), on_delta=gate)
        long.add_done_callback(lambda _: done.append("long"))
        assert gate.reached.wait(timeout=60)
        short = batcher.submit(request("alice", max_new_tokens=2))
        short.add_done_callback(lambda _: done.append("short"))
        # admitted; it may join at the next step
        wait_for("the short request to be admitted", lambda: batcher.occupancy()["ready"] == 1, every=0.005)
        gate.release.set()
        assert len(short.result(timeout=60).token_ids) == 2
        assert len(long.result(timeout=120).token_ids) == LONG, "the long row should run to its length"
    return done


def test_a_short_request_finishes_while_a_long_one_is_still_decoding(setup: Setup) -> None:
    assert finish_order(setup) == ["short", "long"]  # static batching would make it wait for the long one
    # the join policy decides: a newcomer that may never join a running batch waits for it to end
    assert finish_order(setup, join_ratio=100.0, max_join_delay_steps=10_000) == ["long", "short"]
    assert finish_order(setup, join_ratio=100.0, max_join_delay_steps=3) == ["short", "long"]


def test_streamed_deltas_concatenate_to_the_answer_and_never_show_a_stop_string(setup: Setup) -> None:
    (full,) = setup.engine.generate([long_request()])
    cut = next(i for i in range(3, len(full.text)) if full.text[i].isascii() and full.text[i].isprintable())
    stop = full.text[cut : cut + 2] if cut + 2 <= len(full.text) else full.text[cut]
    with ContinuousBatcher(setup.engine) as batcher:
        items = list(batcher.stream(long_request(stop=(stop,))))
        plain = list(batcher.stream(long_request()))
    deltas, result = items[:-1], items[-1]
    assert isinstance(result, GenerationResult) and all(isinstance(d, GenerationDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == result.text == full.text[: full.text.find(stop)]
    assert all(stop not in d.text for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) == len(result.token_ids)
    plain_deltas = [d for d in plain if isinstance(d, GenerationDelta)]
    assert len(plain_deltas) > 1 and "".join(d.text for d in plain_deltas) == full.text  # piece by piece


def test_async_streaming_and_awaiting(setup: Setup) -> None:
    async def main(batcher: ContinuousBatcher) -> tuple[list[object], GenerationResult]:
        items = [item async for item in batcher.stream_async(request("alice", max_new_tokens=6))]
        awaited = await batcher.submit_async(request("alice", max_new_tokens=6))
        return items, awaited

    with ContinuousBatcher(setup.engine) as batcher:
        items, awaited = asyncio.run(main(batcher))
    result = items[-1]
    assert isinstance(result, GenerationResult) and result.token_ids == awaited.token_ids
    assert "".join(d.text for d in items[:-1] if isinstance(d, GenerationDelta)) == result.text


def test_a_cancelled_row_leaves_the_batch_and_frees_its_slots(setup: Setup) -> None:
    gate = Gate(after_tokens=2)
    with ContinuousBatcher(setup.engine) as batcher:
        doomed = batcher.submit(long_request(max_new_tokens=400), on_delta=gate)
        assert gate.reached.wait(timeout=60)
        other = batcher.submit(request("alice", max_new_tokens=4))
        assert doomed.cancel()  # the client went away
        gate.release.set()
        assert len(other.result(timeout=60).token_ids) == 4
        with pytest.raises(NotFoundError):
            batcher.submit(request("mallory")).result(timeout=60)  # errors stay per request
    assert setup.engine.cache.stats().pinned == 0
    snapshot = setup.engine.metrics.snapshot()
    assert snapshot["requests_cancelled"] == 1
    assert isinstance(snapshot["decode_steps"], int) and snapshot["decode_steps"] < 100  # it did not run on


def test_a_request_that_finds_every_slot_pinned_waits_for_a_running_row(
    bank: AdapterBank, backbone: Backbone, adapter_folders: Callable[[int], Path]
) -> None:
    fetch = FolderFetcher()
    members = [member(adapter_folders(seed), adapter_id=seed + 1) for seed in (0, 1)]
    for seed in (0, 1):
        fetch.add(adapter_folders(seed))
    banks = {"alice": user_bank("alice", [members[0]]), "bob": user_bank("bob", [members[1]])}

    def resolve(tenant_id: int, user: str) -> ExpertSet:
        return banks[user]

    cache = AdapterCache(bank, fetch=fetch, capacity_slots=1)
    engine = GenerationEngine(
        backbone, bank, cache, resolve_bank=resolve, gate_factory=gates_by_user({}), embed=zero_embed
    )
    gate = Gate(after_tokens=2)
    with ContinuousBatcher(engine) as batcher:
        alice = batcher.submit(request("alice", max_new_tokens=12), on_delta=gate)
        assert gate.reached.wait(timeout=60)  # alice's adapter holds the only slot
        bob = batcher.submit(request("bob", max_new_tokens=3))
        gate.release.set()
        assert [s.sha256 for s in bob.result(timeout=60).served_by] == [members[1].sha256]
        assert len(alice.result(timeout=60).token_ids) == 12
    assert cache.stats().evictions == 1 and cache.stats().pinned == 0


def test_log_probabilities_are_the_models(setup: Setup) -> None:
    with ContinuousBatcher(setup.engine) as batcher:
        result = batcher.submit(request("bob", logprobs=3)).result(timeout=60)
        plain = batcher.submit(request("bob")).result(timeout=60)
    assert plain.logprobs is None and result.logits is not None and result.logprobs is not None
    assert len(result.logprobs) == len(result.token_ids)
    for step, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        expected = torch.log_softmax(result.logits[step], dim=-1)  # [vocab]
        assert entry.token_id == token and abs(entry.logprob - float(expected[token])) < 1e-4
        assert [t for t, _, _ in entry.top] == expected.topk(3).indices.tolist()
        assert entry.top[0][0] == token  # greedy: the chosen token is the most likely
        assert entry.token == setup.engine.backbone.tokenizer.decode([token])
