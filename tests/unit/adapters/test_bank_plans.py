"""Routing plans and per-row mixing: plan tensors, weighted mixtures, per-token weights, generate, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorafleet.adapters import AdapterBank, SlotConfig, SlotPlan, inject_bank
from lorafleet.backbone import Backbone
from lorafleet.errors import InvalidStateError, ValidationError

LAYER = "model.layers.1.mlp.down_proj"


def test_plan_pads_rows_and_finds_used_slots() -> None:
    plan = SlotPlan.from_rows([[(3, 0.25), (1, 0.75)], [], [(2, 0.0)], [(1, 0.5), (1, 0.5)]])
    assert plan.batch_size == 4 and plan.k == 2
    assert plan.slot_ids.tolist() == [[1, 3], [-1, -1], [2, -1], [1, -1]]
    assert plan.weights.tolist() == [[0.75, 0.25], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    assert plan.used_slots == (1, 3)  # a zero weight is padding, not a use
    assert plan.uniform is None
    t = plan.tensors(torch.device("cpu"))
    assert t.used.tolist() == [1, 3]
    assert t.local_ids.tolist() == [[0, 1], [0, 0], [0, 0], [0, 0]]
    assert t.weights.tolist() == plan.weights.tolist()
    assert plan.tensors(torch.device("cpu")) is t  # computed once per device


def test_uniform_plans_and_generate_expansion() -> None:
    assert SlotPlan.single([4, 4, 4]).uniform == (4, 1.0)
    assert SlotPlan.single([4, None]).uniform is None
    assert SlotPlan.from_rows([[(2, 0.5)], [(2, 0.5)]]).uniform == (2, 0.5)
    plan = SlotPlan.single([0, None, 1])
    expanded = plan.for_batch(6)
    assert expanded.slot_ids[:, 0].tolist() == [0, 0, -1, -1, 1, 1]
    assert plan.for_batch(3) is plan and plan.for_batch(6) is expanded
    with pytest.raises(ValidationError):
        plan.for_batch(4)


@pytest.mark.parametrize(
    "rows",
    [[[(-1, 1.0)]], [[(0, float("nan"))]], [[(True, 1.0)]], []],
    ids=["negative", "nan", "bool", "empty"],
)
def test_bad_plans_are_refused(rows: list[list[tuple[int, float]]]) -> None:
    with pytest.raises(ValidationError):
        SlotPlan.from_rows(rows)


def test_weighted_mixture_is_the_weighted_sum_of_single_deltas(
    fp32_backbone: Backbone, tools: SimpleNamespace
) -> None:
    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=4, max_rank=8)
    for slot, rank in enumerate([2, 8, 5]):
        tools.load_random(bank, slot, rank=rank, alpha=2.0 * rank, seed=10 + slot)
    layer = bank.layers[LAYER]
    x = torch.randn(3, 6, layer.in_features, generator=torch.Generator().manual_seed(0))  # [batch, seq, d_in]

    def run(plan: SlotPlan | None) -> torch.Tensor:
        with bank.use(plan), torch.no_grad():
            return layer(x)  # [batch, seq, d_out]

    base = run(None)
    deltas = {s: run(SlotPlan.single([s] * 3)) - base for s in range(3)}
    rows = [[(0, 0.3), (1, 0.7)], [(0, 0.2), (1, -0.5), (2, 1.5)], [(2, 1.0)]]
    mixed = run(SlotPlan.from_rows(rows))
    for i, row in enumerate(rows):
        expected = base[i] + sum(w * deltas[s][i] for s, w in row)
        assert (mixed[i] - expected).abs().max().item() <= 1e-5

    low_rank = run(SlotPlan.single([0, 2, None]))  # ranks 2 and 5 < max rank 8: a sliced gather
    expected = torch.stack([base[0] + deltas[0][0], base[1] + deltas[2][1], base[2]])
    assert (low_rank - expected).abs().max().item() <= 1e-5

    token_weights = torch.rand(3, 6, 3, generator=torch.Generator().manual_seed(1))  # [batch, seq, k]
    per_token = SlotPlan.from_rows([[(0, 1.0), (1, 1.0), (2, 1.0)]] * 3).with_token_weights(token_weights)
    got = run(per_token)
    expected = base + sum(token_weights[..., s : s + 1] * deltas[s] for s in range(3))
    assert (got - expected).abs().max().item() <= 1e-5


def test_generate_uses_the_plan_at_every_step(
    fp32_backbone: Backbone, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    model = fp32_backbone.model
    bank = inject_bank(fp32_backbone, target_modules=["q_proj", "v_proj", "o_proj"], n_slots=3, max_rank=4)
    for slot in range(3):
        bank.load_slot(
            slot, tools.random_adapter(bank, rank=4, seed=slot, scale=1.0), SlotConfig(rank=4, alpha=8)
        )
    routes = [0, 1, None, 2]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with bank.use(SlotPlan.single(routes)):
        together = model.generate(input_ids, **kwargs)
    for row, slot in enumerate(routes):
        with bank.use(SlotPlan.single([slot])):
            alone = model.generate(input_ids[row : row + 1], **kwargs)
        assert torch.equal(together[row], alone[0])
    with bank.base_only():
        base = model.generate(input_ids, **kwargs)
    assert not torch.equal(base, together)
    with bank.use(SlotPlan.single(routes)):
        beams = model.generate(input_ids, num_beams=2, **kwargs)  # beam search repeats each row
    with bank.use(SlotPlan.single([routes[1]])):
        beams_alone = model.generate(input_ids[1:2], num_beams=2, **kwargs)
    assert torch.equal(beams[1], beams_alone[0])


def test_forward_needs_a_plan_and_plans_need_loaded_slots(
    fp32_backbone: Backbone, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj"], n_slots=2, max_rank=4)
    tools.load_random(bank, 0, rank=2, alpha=2, seed=0)
    with pytest.raises(InvalidStateError, match="routing plan"):
        fp32_backbone.model(input_ids)
    with pytest.raises(ValidationError, match="empty slots"):
        with bank.use(SlotPlan.single([1] * 4)):
            pass
    with pytest.raises(ValidationError, match="2 slots"):
        with bank.use(SlotPlan.single([5] * 4)):
            pass
    with pytest.raises(ValidationError, match="rows"), bank.use(SlotPlan.single([0] * 3)):
        fp32_backbone.model(input_ids)
    with bank.use(SlotPlan.single([0] * 4)):
        with bank.base_only():
            inner = bank._plan_state.plan
        assert bank._plan_state.plan is not None and inner is None  # contexts nest and restore


def test_rows_grouped_by_adapter_run_as_segments() -> None:
    plan = SlotPlan.single([0, 0, 0, 2, 2, None, None, None])
    assert [(s.slot, s.start, s.end) for s in plan.segments or ()] == [(0, 0, 3), (2, 3, 5), (None, 5, 8)]
    assert SlotPlan.single([0, 1, 0, 1]).segments is None  # as many runs as rows: gather per row
    assert SlotPlan.from_rows([[(0, 0.5), (1, 0.5)]] * 4).segments is None  # mixtures have no segments


def _outputs_and_grads(
    backbone: Backbone, bank: AdapterBank, plan: SlotPlan, ids: torch.Tensor, *, slots: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits of ``ids`` through ``plan`` and the gradients of the ``slots``' parameters (released after)."""
    params = bank.trainable_parameters(slots)
    with bank.use(plan):
        logits = backbone.model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in params if p.grad is not None]
    for p in params:
        p.grad = None
    bank.release_parameters()
    return logits.detach(), grads


def test_segments_compute_what_the_per_row_gather_computes(
    fp32_backbone: Backbone, tools: SimpleNamespace
) -> None:
    """Outputs and every slot's gradients agree between the segment path and the per-row gather path."""
    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=3, max_rank=8)
    for slot in (0, 1):
        tools.load_random(bank, slot, rank=4 + 2 * slot, alpha=8.0, seed=slot)
    ids = torch.randint(3, 200, (6, 9), generator=torch.Generator().manual_seed(0))
    grouped = [0, 0, 0, 1, 1, None]
    results = []
    for segmented in (True, False):
        plan = SlotPlan.single(grouped)
        if not segmented:
            plan._cache[("segments",)] = None  # force the per-row gather
        assert (plan.segments is not None) == segmented
        results.append(_outputs_and_grads(fp32_backbone, bank, plan, ids, slots=[0, 1]))
    (seg_out, seg_grads), (row_out, row_grads) = results
    assert torch.allclose(seg_out, row_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(seg_grads, row_grads, strict=True))
    with torch.no_grad(), bank.use(SlotPlan.single(grouped)):  # in place, without autograd
        assert torch.allclose(fp32_backbone.model(input_ids=ids).logits, seg_out, atol=1e-5)


def test_equal_runs_of_one_rank_train_as_a_stacked_batch(
    fp32_backbone: Backbone, tools: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training step's runs (equal lengths, one rank; a slot may come twice) computed as one batched matmul pair
    give the outputs and gradients of one delta per run."""
    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=3, max_rank=8)
    for slot in (0, 1, 2):
        tools.load_random(bank, slot, rank=4, alpha=8.0, seed=slot)
    ids = torch.randint(3, 200, (8, 9), generator=torch.Generator().manual_seed(0))
    grouped = [0, 0, 1, 1, 2, 2, 0, 0]
    calls = {"stacked": 0}
    stacked = type(bank.layers[LAYER])._stacked_delta

    def counting(self, xa, segments):  # type: ignore[no-untyped-def]
        out = stacked(self, xa, segments)
        calls["stacked"] += out is not None
        return out

    results = []
    for path in ("stacked", "per run"):
        monkeypatch.setattr(
            type(bank.layers[LAYER]), "_stacked_delta", counting if path == "stacked" else lambda *a: None
        )
        results.append(
            _outputs_and_grads(fp32_backbone, bank, SlotPlan.single(grouped), ids, slots=[0, 1, 2])
        )
    assert calls["stacked"] == len(bank.layers)  # every adapted module took the stacked path
    (st_out, st_grads), (run_out, run_grads) = results
    assert torch.allclose(st_out, run_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(st_grads, run_grads, strict=True))
