"""Decoding through a bank: gathered rows reused across forwards, rank buckets, interned plans, the serving dtype.

The reference everywhere is the per-row gather of the gradient path (``BankLinear._add_mixed``), which is what
every mixed forward computed before the rows were cached: the cached, bucketed path must compute the same.
"""

from __future__ import annotations

import pytest
import torch
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig, inject_bank, remove_bank, serving_dtype
from lorafleet.adapters.linear import BankLinear, rank_bucket
from lorafleet.adapters.plan import SlotPlan
from lorafleet.backbone import Backbone

MAX_RANK = 8


def random_adapter(bank: AdapterBank, *, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA weights in PEFT key names on every layer of the bank."""
    return random_lora_weights(bank, rank=rank, seed=seed, scale=0.2)


def _load(bank: AdapterBank, slot: int, rank: int, seed: int) -> None:
    bank.load_slot(slot, random_adapter(bank, rank=rank, seed=seed), SlotConfig(rank=rank, alpha=2.0 * rank))


@pytest.fixture
def bank(fp32_backbone: Backbone) -> AdapterBank:
    """Four slots of ranks 2, 3, 8 and 8 on every linear layer of the tiny backbone (fp32)."""
    bank = inject_bank(fp32_backbone, n_slots=4, max_rank=MAX_RANK)
    for slot, rank in enumerate((2, 3, 8, 8)):
        _load(bank, slot, rank, seed=slot + 10)
    return bank


def _logits(bank: AdapterBank, plan: SlotPlan, ids: torch.Tensor, *, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad), bank.use(plan):
        return bank.model(input_ids=ids).logits.detach()


def _assert_as_the_gradient_path(
    served: torch.Tensor, bank: AdapterBank, plan: SlotPlan, ids: torch.Tensor, *, tol: float = 1e-5
) -> None:
    """``served`` (logits of the cached, bucketed path) equal the gradient path's per-row gather within ``tol``."""
    torch.testing.assert_close(served, _logits(bank, plan, ids, grad=True), rtol=tol, atol=tol)


def _first(bank: AdapterBank) -> BankLinear:
    return next(iter(bank.layers.values()))


MIXED_ROWS = [
    [[(0, 1.0)], [(2, 1.0)], [(1, 0.5)], [(3, 1.0)]],  # one slot per row, ranks 2, 8, 3, 8
    [[(0, 1.0), (2, 0.5)], [], [(1, 1.0)], [(3, 0.25), (1, 0.75)]],  # mixtures and a base-only row
]


@pytest.mark.parametrize("rows", MIXED_ROWS)
def test_cached_rows_compute_what_the_per_row_gather_computes(
    bank: AdapterBank, input_ids: torch.Tensor, rows: list[list[tuple[int, float]]]
) -> None:
    plan = SlotPlan.from_rows(rows)
    reference = _logits(bank, plan, input_ids, grad=True)  # the gradient path gathers per row, every time
    cached = _logits(bank, plan, input_ids, grad=False)
    again = _logits(bank, plan, input_ids, grad=False)  # second forward: the kept rows
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, cached)
    base = _logits(bank, SlotPlan.base_only(4), input_ids, grad=False)
    assert not torch.allclose(cached, base)


def test_per_token_weights_use_the_cached_rows_too(bank: AdapterBank, input_ids: torch.Tensor) -> None:
    plan = SlotPlan.from_rows([[(0, 1.0), (2, 1.0)], [(1, 1.0), (3, 1.0)]] * 2)
    weights = torch.rand(4, input_ids.shape[1], 2, generator=torch.Generator().manual_seed(3))
    plan = plan.with_token_weights(weights)
    _assert_as_the_gradient_path(_logits(bank, plan, input_ids, grad=False), bank, plan, input_ids)


def test_equal_routes_give_the_same_plan_and_reuse_the_gathered_rows(bank: AdapterBank) -> None:
    rows = [[(0, 1.0)], [(2, 1.0)], [(1, 1.0)]]
    first, second = SlotPlan.from_rows(rows), SlotPlan.from_rows([list(r) for r in rows])
    assert first is second  # a decoder rebuilding its plan at every step gets the same object back
    assert SlotPlan.from_rows(rows[:2]) is not first
    rebuilt = SlotPlan(first.slot_ids.clone(), first.weights.clone())  # not interned: equal content
    assert rebuilt is not first and rebuilt.key == first.key
    layer = _first(bank)
    work = layer.row_work(first, torch.device("cpu"))
    assert layer.row_work(rebuilt, torch.device("cpu")) is work


def test_a_slot_write_rebuilds_the_gathered_rows(bank: AdapterBank, input_ids: torch.Tensor) -> None:
    plan = SlotPlan.from_rows([[(0, 1.0)], [(2, 1.0)], [(1, 1.0)], [(3, 1.0)]])
    before = _logits(bank, plan, input_ids, grad=False)
    layer = _first(bank)
    work = layer.row_work(plan, torch.device("cpu"))
    _load_replace(bank, slot=2, rank=8, seed=99)  # a new version in a slot the plan uses
    after = _logits(bank, plan, input_ids, grad=False)
    assert layer.row_work(plan, torch.device("cpu")) is not work
    assert not torch.allclose(after, before)
    _assert_as_the_gradient_path(after, bank, plan, input_ids)


def test_an_in_place_update_through_a_training_view_rebuilds_the_gathered_rows(
    bank: AdapterBank, input_ids: torch.Tensor
) -> None:
    plan = SlotPlan.from_rows([[(0, 1.0)], [(2, 1.0)], [(1, 1.0)], [(3, 1.0)]])
    before = _logits(bank, plan, input_ids, grad=False)
    params = bank.trainable_parameters([2])
    with torch.no_grad():  # what an optimiser step does: in place, through the slot's views
        for p in params:
            p.add_(0.05)
    after = _logits(bank, plan, input_ids, grad=False)
    assert not torch.allclose(after, before)
    _assert_as_the_gradient_path(after, bank, plan, input_ids)


def _load_replace(bank: AdapterBank, *, slot: int, rank: int, seed: int) -> None:
    tensors = random_adapter(bank, rank=rank, seed=seed)
    bank.load_slot(slot, tensors, SlotConfig(rank=rank, alpha=2.0 * rank), replace=True)


def test_rows_are_computed_in_rank_buckets_not_at_the_largest_rank(bank: AdapterBank) -> None:
    assert [rank_bucket(r, MAX_RANK) for r in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert rank_bucket(12, 16) == 16 and rank_bucket(12, 12) == 12
    layer = _first(bank)
    plan = SlotPlan.from_rows([[(0, 1.0)], [(2, 1.0)], [(1, 1.0)], [(3, 1.0)]])  # ranks 2, 8, 3, 8
    work = layer.row_work(plan, torch.device("cpu"))
    by_rank = {b.rank: (None if b.rows is None else b.rows.tolist()) for b in work.buckets}
    assert by_rank == {2: [0], 8: [1, 3], 3: [2]}  # rank 3 sits in bucket 4 and is computed at rank 3
    d_in, d_out = layer.in_features, layer.out_features
    padded = 4 * MAX_RANK * (d_in + d_out) * 4  # what the rows cost at the largest rank, fp32
    assert work.nbytes < padded
    assert sum(b.a.numel() + b.b.numel() for b in work.buckets) == (2 + 8 + 8 + 3) * (d_in + d_out)
    single = layer.row_work(SlotPlan.from_rows([[(2, 1.0)], [(3, 1.0)]]), torch.device("cpu"))
    assert [(b.rank, b.rows) for b in single.buckets] == [(8, None)]  # one bucket: every row, no row index


def test_rows_on_a_4bit_backbone_match_the_per_row_gather(
    nf4_backbone: Backbone, input_ids: torch.Tensor
) -> None:
    bank = inject_bank(nf4_backbone, n_slots=3, max_rank=4)
    for slot, rank in enumerate((4, 2, 4)):
        _load(bank, slot, rank, seed=slot)
    plan = SlotPlan.from_rows([[(0, 1.0)], [(1, 1.0)], [(2, 1.0)], [(0, 0.5), (1, 0.5)]])
    _assert_as_the_gradient_path(_logits(bank, plan, input_ids, grad=False), bank, plan, input_ids, tol=1e-4)


def test_serving_dtype_and_a_half_precision_bank(fp32_backbone: Backbone) -> None:
    assert serving_dtype("cpu") == torch.float32
    if torch.cuda.is_available():
        assert serving_dtype("cuda") in (torch.bfloat16, torch.float16)
    full = inject_bank(fp32_backbone, n_slots=2, max_rank=4)
    assert full.dtype == torch.float32
    for slot in range(2):
        _load(full, slot, 4, seed=slot)
    ids = torch.randint(3, 259, (2, 5), generator=torch.Generator().manual_seed(1))
    plan = SlotPlan.single([0, 1])
    reference = _logits(full, plan, ids, grad=False)
    states = [full.slot_state_dict(s) for s in range(2)]
    full_bytes = full.nbytes
    model = remove_bank(full)
    half = inject_bank(model, n_slots=2, max_rank=4, dtype=torch.bfloat16)
    for slot in range(2):
        half.load_slot(slot, states[slot], SlotConfig(rank=4, alpha=8.0))
    layer = _first(half)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert half.nbytes * 2 == full_bytes  # the stacks cost half of fp32's
    assert layer.row_work(plan, torch.device("cpu")).buckets[0].a.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(half, plan, ids, grad=False), reference, rtol=0.05, atol=0.05)
