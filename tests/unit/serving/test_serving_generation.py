"""Batched generation across users: a mixed batch equals each request alone, base rows equal the base model,
seeded sampling and top-p, stop strings, per-request failures, what a response says served it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from engine_world import PROMPTS, Setup, assert_same, request
from serving_helpers import (
    FixedGate,
    gates_by_user,
    member,
    user_bank,
    write_adapter,
    zero_embed,
)

from lorafleet.adapters import AdapterBank, inject_bank
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.errors import GenerationError, NotFoundError, ValidationError
from lorafleet.routing.experts import ExpertSet
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationResult, prometheus_text
from lorafleet.serving.decode import BatchDecoder, RowSpec


def test_mixed_batch_equals_each_request_alone(setup: Setup) -> None:
    users = ["alice", "bob", "carol", "dave", "bob"]
    batch = [request(u) for u in users[:-1]] + [request("bob", prompt=PROMPTS["carol"])]
    together = setup.engine.generate(batch)
    for req, result in zip(batch, together, strict=True):
        (alone,) = setup.engine.generate([req])
        assert_same(result, alone)
    # the adapters matter: alice's prompt through the base (as carol) gives other logits
    (base,) = setup.engine.generate([request("carol", prompt=PROMPTS["alice"])])
    assert base.logits is not None and together[0].logits is not None
    assert (base.logits[0] - together[0].logits[0]).abs().max().item() > 1e-2


def test_base_rows_equal_the_base_model(setup: Setup, tiny_dir: Path) -> None:
    bare = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    prompt = PROMPTS["carol"]
    results = setup.engine.generate([request("alice"), request("carol", max_new_tokens=12), request("bob")])
    carol = results[1]
    ids = bare.tokenizer(prompt, return_tensors="pt").input_ids  # [1, seq]
    with torch.no_grad():
        expected = bare.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)  # type: ignore[operator]
        first = bare.model(ids).logits[0, -1]  # [vocab]
    assert carol.served_by == () and carol.bank_revision == "empty"
    assert list(carol.token_ids) == expected[0, ids.shape[1] :].tolist()
    assert carol.logits is not None and (carol.logits[0] - first).abs().max().item() <= 1e-5


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(setup: Setup) -> None:
    sampled = request("alice", temperature=0.9, top_p=0.95, seed=7, max_new_tokens=16)
    (alone,) = setup.engine.generate([sampled])
    (again,) = setup.engine.generate([sampled])
    mixed = setup.engine.generate([request("bob"), sampled, request("carol", temperature=1.0)])
    assert alone.token_ids == again.token_ids == mixed[1].token_ids
    (other_seed,) = setup.engine.generate(
        [request("alice", temperature=0.9, top_p=0.95, seed=8, max_new_tokens=16)]
    )
    assert other_seed.token_ids != alone.token_ids
    (greedy,) = setup.engine.generate([request("alice", max_new_tokens=16)])
    assert greedy.token_ids != alone.token_ids  # sampling did sample


def test_top_p_keeps_sampling_inside_the_nucleus(setup: Setup) -> None:
    (greedy,) = setup.engine.generate([request("bob", max_new_tokens=10)])
    (tiny_p,) = setup.engine.generate(
        [request("bob", temperature=2.0, top_p=1e-6, seed=3, max_new_tokens=10)]
    )
    assert tiny_p.token_ids == greedy.token_ids  # only the top token is left
    batch = [request("dave", temperature=1.0, top_p=0.3, seed=s, max_new_tokens=1) for s in range(24)]
    results = setup.engine.generate(batch)
    assert results[0].logits is not None
    probs = torch.softmax(results[0].logits[0], dim=-1)  # [vocab], the same prompt for every row
    sorted_probs, order = probs.sort(descending=True)
    nucleus = set(order[: int((sorted_probs.cumsum(0) - sorted_probs < 0.3).sum())].tolist())
    drawn = {r.token_ids[0] for r in results}
    assert drawn <= nucleus and len(drawn) > 1


def test_stop_strings_end_a_row_and_are_cut_from_the_text(setup: Setup) -> None:
    # the tiny model emits random bytes: stop at the first ASCII character after the first one of some row
    fulls = setup.engine.generate([request(u, max_new_tokens=24) for u in PROMPTS])
    user, full, at = next(
        (u, f, i)
        for u, f in zip(PROMPTS, fulls, strict=True)
        for i in range(1, len(f.text))
        if f.text[i].isascii() and f.text[i].isprintable()
    )
    stop = full.text[at]
    expected = full.text[: full.text.find(stop)]
    results = setup.engine.generate(
        [request(user, max_new_tokens=24, stop=("never-appears", stop)), request("carol", stop=("zzzzzz",))]
    )
    stopped = results[0]
    assert stopped.finish_reason == "stop" and stopped.text == expected
    assert full.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    assert len(stopped.token_ids) < len(full.token_ids)
    assert results[1].finish_reason == "length" and len(results[1].token_ids) == 8


def test_rows_of_different_lengths_finish_independently(setup: Setup) -> None:
    batch = [
        request("alice", max_new_tokens=3),
        request("bob", max_new_tokens=11),
        request("carol", max_new_tokens=1),
    ]
    results = setup.engine.generate(batch)
    assert [len(r.token_ids) for r in results] == [3, 11, 1]
    assert all(r.finish_reason == "length" for r in results)
    (bob_alone,) = setup.engine.generate([batch[1]])
    assert_same(results[1], bob_alone)  # rows dropped from the KV cache mid-batch do not disturb the others


def test_responses_say_which_versions_served_them(setup: Setup) -> None:
    alice, bob, carol, dave = setup.engine.generate([request(u, max_new_tokens=2) for u in PROMPTS])
    m = {u: setup.banks[u].members for u in PROMPTS}
    assert [(s.adapter_id, s.version_id, s.sha256, s.weight) for s in alice.served_by] == [
        (m["alice"][0].adapter_id, m["alice"][0].version_id, m["alice"][0].sha256, 1.0)
    ]
    assert [(s.sha256, s.weight) for s in bob.served_by] == [
        (m["bob"][0].sha256, 0.3),
        (m["bob"][1].sha256, 0.7),
    ]
    assert carol.served_by == () and dave.served_by[0].weight == 0.5
    assert bob.bank_revision == setup.banks["bob"].revision and bob.versions == tuple(
        x.version_id for x in m["bob"]
    )


def test_a_failing_request_does_not_fail_the_batch(setup: Setup) -> None:
    too_long = request("alice", prompt="y" * 600)  # the tiny model's context is 512 positions
    outcomes = setup.engine.generate_each([request("alice"), request("mallory"), too_long, request("carol")])
    assert isinstance(outcomes[0], GenerationResult) and isinstance(outcomes[3], GenerationResult)
    assert isinstance(outcomes[1], NotFoundError)
    assert isinstance(outcomes[2], ValidationError) and "context" in str(outcomes[2])
    with pytest.raises(NotFoundError):
        setup.engine.generate([request("carol"), request("mallory")])
    snap = setup.engine.metrics.snapshot()
    assert snap["requests"] == 6 and snap["requests_failed"] == 3 and snap["batches"] == 2
    assert snap["failures"] == {"not_found": 2, "validation_error": 1}


def test_a_bad_gate_fails_only_its_users_requests(
    bank: AdapterBank, backbone: Backbone, setup: Setup
) -> None:
    engine = GenerationEngine(
        backbone,
        bank,
        setup.engine.cache,
        resolve_bank=lambda t, u: setup.banks[u],
        gate_factory=gates_by_user({"bob": FixedGate(((5, 1.0),))}),  # bob has 2 members
        embed=zero_embed,
    )
    outcomes = engine.generate_each([request("bob"), request("alice"), request("bob")])
    assert isinstance(outcomes[0], ValidationError) and outcomes[2] is outcomes[0]
    assert isinstance(outcomes[1], GenerationResult) and outcomes[1].served_by


def test_default_gate_and_embeddings(setup: Setup, bank: AdapterBank, backbone: Backbone) -> None:
    """The routing package's pooled embeddings and centroid gate (keyless members: the personal adapters)."""
    engine = GenerationEngine(backbone, bank, setup.engine.cache, resolve_bank=lambda t, u: setup.banks[u])
    alice, bob, carol = engine.generate([request("alice"), request("bob"), request("carol")])
    assert [s.weight for s in alice.served_by] == [1.0]
    assert [s.weight for s in bob.served_by] == [0.5, 0.5]
    assert carol.served_by == ()


class CountingEmbed:
    """Records the shape of each embedding call; returns zeros."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, backbone: object, bank: object, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(ids.shape))
        return torch.zeros(ids.shape[0], 64)


@dataclass
class NoEmbeddingGate(FixedGate):
    def needs_embeddings(self, bank: ExpertSet) -> bool:
        return False


def test_one_embedding_forward_per_batch_and_only_for_gates_that_need_it(
    setup: Setup, bank: AdapterBank, backbone: Backbone
) -> None:
    embed = CountingEmbed()
    engine = GenerationEngine(
        backbone,
        bank,
        setup.engine.cache,
        resolve_bank=lambda t, u: setup.banks[u],
        gate_factory=gates_by_user({"dave": NoEmbeddingGate()}),
        embed=embed,
        embed_max_tokens=10,
    )
    results = engine.generate([request("alice"), request("bob"), request("carol"), request("dave")])
    assert embed.shapes == [(2, 10)]  # alice and bob in one forward, prompts cut to their last 10 tokens
    assert results[3].served_by and results[2].served_by == ()
    engine.generate([request("dave"), request("carol")])
    assert len(embed.shapes) == 1  # nobody needed embeddings


def test_a_gate_factory_error_fails_only_that_users_requests(
    setup: Setup, bank: AdapterBank, backbone: Backbone
) -> None:
    def factory(user_bank: ExpertSet) -> FixedGate:
        if user_bank.external_id == "bob":
            raise ValidationError("a learned gate spec needs load_learned")
        return FixedGate()

    engine = GenerationEngine(
        backbone,
        bank,
        setup.engine.cache,
        resolve_bank=lambda t, u: setup.banks[u],
        gate_factory=factory,
        embed=zero_embed,
    )
    outcomes = engine.generate_each([request("bob"), request("alice")])
    assert isinstance(outcomes[0], ValidationError) and isinstance(outcomes[1], GenerationResult)


def test_engine_metrics_in_prometheus_text(setup: Setup) -> None:
    setup.engine.generate([request("alice", max_new_tokens=3), request("carol", max_new_tokens=2)])
    text = prometheus_text(
        setup.engine.metrics, setup.engine.cache.stats(), prefix_cache=setup.engine.prefix_cache
    )
    assert "lorafleet_serving_requests_total 2\n" in text
    assert "lorafleet_serving_completion_tokens_total 5\n" in text
    assert (
        "lorafleet_serving_rows_base_total 1\n" in text and "lorafleet_serving_rows_adapter_total 1\n" in text
    )
    assert 'lorafleet_serving_batch_size_bucket{le="2"} 1\n' in text
    assert "lorafleet_adapter_cache_misses_total 1\n" in text
    # the two prompts left their whole blocks of 8 tokens; being the first, they found none
    assert (
        "lorafleet_prefix_cache_hit_tokens_total 0\n" in text and "lorafleet_prefix_cache_blocks 10\n" in text
    )
    assert "lorafleet_prefix_cache_lookup_tokens_total" in text and "lorafleet_prefix_cache_bytes" in text
    assert "lorafleet_adapter_cache_host_hits_total 0\n" in text  # this cache has no host tier
    assert "lorafleet_adapter_cache_host_entries 0\n" in text


def test_serving_on_a_4bit_backbone(setup: Setup, tiny_dir: Path) -> None:
    """The production layout (nf4 base, fp32 adapters): a mixed batch still equals each request alone."""
    nf4 = load_backbone(tiny_dir, quantization="nf4", device="cpu")
    bank = inject_bank(nf4, target_modules="all-linear", n_slots=4, max_rank=8)
    cache = AdapterCache(bank, fetch=setup.fetch)
    engine = GenerationEngine(
        nf4,
        bank,
        cache,
        resolve_bank=lambda t, u: setup.banks[u],
        gate_factory=gates_by_user({}),
        embed=zero_embed,
    )
    batch = [request("alice"), request("carol"), request("dave")]
    together = engine.generate(batch)
    for req, result in zip(batch, together, strict=True):
        (alone,) = engine.generate([req])
        assert result.token_ids == alone.token_ids
        assert result.logits is not None and alone.logits is not None
        assert (result.logits[0] - alone.logits[0]).abs().max().item() <= 1e-4


def test_a_row_with_non_finite_logits_or_unusable_sampling_fails_alone(
    bank: AdapterBank, backbone: Backbone, author_bank: AdapterBank, tmp_path: Path, setup: Setup
) -> None:
    """mallory's adapter is finite but absurd (B x 1e30): its logits overflow. Her request fails with a
    GenerationError naming the version, the engine reports it once, and every other row decodes as it would
    alone. A row whose sampling cannot work (a temperature below the validated minimum, set on the decoder's
    own spec) fails alone too."""
    poisoned = write_adapter(author_bank, tmp_path / "poisoned", seed=9, scale=1e15)  # B @ A ~ 1e30
    setup.fetch.add(poisoned)
    broken = member(poisoned, adapter_id=99, name="personal")
    banks = {**setup.banks, "mallory": user_bank("mallory", [broken])}
    reported: list[tuple[str, list[int]]] = []
    engine = GenerationEngine(
        backbone,
        bank,
        AdapterCache(bank, fetch=setup.fetch),
        resolve_bank=lambda tenant_id, user: banks[user],
        gate_factory=gates_by_user({"bob": FixedGate(((0, 0.3), (1, 0.7)))}),
        embed=zero_embed,
        on_nonfinite=lambda b, members: reported.append((b.external_id, [m.version_id for m in members])),
    )
    batch = [request("alice"), request("mallory"), request("bob"), request("carol")]
    outcomes = engine.generate_each(batch)
    assert isinstance(outcomes[1], GenerationError), outcomes[1]
    assert "non-finite logits at step 1" in str(outcomes[1]) and "personal v1" in str(outcomes[1])
    assert reported == [("mallory", [broken.version_id])]
    for req, result in zip(batch, outcomes, strict=True):
        if req.user != "mallory":
            assert isinstance(result, GenerationResult)
            assert_same(result, engine.generate([req])[0])

    ids = tuple(backbone.tokenizer.encode("Hello", add_special_tokens=False))
    decoder = BatchDecoder(bank.model, bank, backbone.tokenizer, device=bank.device)
    rows = [
        RowSpec(prompt_ids=ids, routes=(), max_new_tokens=4),
        RowSpec(prompt_ids=ids, routes=(), max_new_tokens=4, temperature=1e-40, seed=1),
    ]
    good, bad = decoder.run(rows)
    assert bad.error is not None and bad.error.startswith("sampling failed") and not bad.token_ids
    assert good.error is None and good.token_ids == decoder.run(rows[:1])[0].token_ids
    with pytest.raises(ValidationError, match="temperature"):
        request("alice", temperature=1e-40)


def test_the_personalization_dial_scales_every_adapter_weight(setup: Setup) -> None:
    """``adapter_scale`` 1 is full personalization, 0 the base model (nothing routed or loaded), in between the
    gate's weights times the dial; out of [0, 1] is refused."""
    (full,) = setup.engine.generate([request("bob")])
    (half,) = setup.engine.generate([request("bob", adapter_scale=0.5)])
    (off,) = setup.engine.generate([request("bob", adapter_scale=0.0)])
    (base,) = setup.engine.generate([request("carol", prompt=PROMPTS["bob"])])
    assert [s.weight for s in full.served_by] == pytest.approx([0.3, 0.7])
    assert [s.weight for s in half.served_by] == pytest.approx([0.15, 0.35])
    assert off.served_by == () and off.token_ids == base.token_ids
    assert off.logits is not None and base.logits is not None and torch.equal(off.logits, base.logits)
    assert half.logits is not None and full.logits is not None
    assert (half.logits[0] - full.logits[0]).abs().max() > 1e-4 and (
        half.logits[0] - base.logits[0]
    ).abs().max() > 1e-4
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError, match="adapter_scale"):
            request("bob", adapter_scale=bad)
