"""The engine the serving tests share (``setup`` fixture): four users on the real tiny backbone, with real adapter
folders: alice one adapter, bob a 0.3/0.7 mixture of two, carol none, dave one at weight 0.5."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving_helpers import FixedGate, FolderFetcher, gates_by_user, member, user_bank, zero_embed

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.errors import NotFoundError
from lorafleet.routing.experts import ExpertSet
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationRequest, GenerationResult

PROMPTS = {
    "alice": "Hello there, how are you?",
    "bob": "Q: 2+2?",
    "carol": "The quick brown fox jumps over the lazy dog, twice over.",
    "dave": "x",
}


@dataclass
class Setup:
    engine: GenerationEngine
    banks: dict[str, ExpertSet]
    fetch: FolderFetcher


def make_setup(bank: AdapterBank, backbone: Backbone, adapter_folders: Callable[[int], Path]) -> Setup:
    """alice: one adapter; bob: a 0.3/0.7 mixture of two; carol: no adapter; dave: one adapter at weight 0.5."""
    fetch = FolderFetcher()
    m = [member(adapter_folders(seed), adapter_id=seed + 1) for seed in range(4)]
    for seed in range(4):
        fetch.add(adapter_folders(seed))
    banks = {
        "alice": user_bank("alice", [m[0]]),
        "bob": user_bank("bob", [m[1], m[2]]),
        "carol": user_bank("carol", []),
        "dave": user_bank("dave", [m[3]]),
    }
    gates = {"bob": FixedGate(((0, 0.3), (1, 0.7))), "dave": FixedGate(((0, 0.5),))}

    def resolve(tenant_id: int, user: str) -> ExpertSet:
        if user not in banks:
            raise NotFoundError(f"user {user!r} not found")
        return banks[user]

    cache = AdapterCache(bank, fetch=fetch)
    engine = GenerationEngine(
        backbone, bank, cache, resolve_bank=resolve, gate_factory=gates_by_user(gates), embed=zero_embed
    )
    return Setup(engine, banks, fetch)


def request(user: str, **kwargs: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompt": PROMPTS.get(user, "hi"),
        "max_new_tokens": 8,
        "return_logits": True,
    }
    fields.update(kwargs)
    return GenerationRequest(tenant_id=1, user=user, **fields)  # type: ignore[arg-type]


def assert_same(batched: GenerationResult, alone: GenerationResult) -> None:
    assert batched.logits is not None and alone.logits is not None
    assert (batched.logits[0] - alone.logits[0]).abs().max().item() <= 1e-5  # first step
    assert batched.token_ids == alone.token_ids and batched.text == alone.text
    assert (batched.logits - alone.logits).abs().max().item() <= 1e-4  # every step (same tokens fed back)
