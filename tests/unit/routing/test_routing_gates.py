"""Gate maths on hand-made banks and embeddings: centroid top-k and temperature, fixed, learned, plans."""

from __future__ import annotations

import math

import pytest
import torch
from routing_helpers import member, user_bank

from lorafleet.errors import ValidationError
from lorafleet.routing import (
    CentroidGate,
    ExpertSet,
    FixedGate,
    GateDecision,
    GateSpec,
    LearnedGate,
    build_gate,
    plan_from_decisions,
)
from lorafleet.routing.embeddings import common_direction, key_vectors
from lorafleet.routing.gates import GENERAL_MARGIN
from lorafleet.routing.learned import GateNetwork, LearnedGateModel

#: three unit keys in 3-d space
KEYS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _softmax(scores: list[float], temperature: float) -> list[float]:
    exps = [math.exp(s / temperature) for s in scores]
    return [e / sum(exps) for e in exps]


def _bank3() -> ExpertSet:
    return user_bank([member(i, key=k) for i, k in enumerate(KEYS)])


def test_centroid_scores_by_cosine_keeps_top_k_and_applies_the_temperature() -> None:
    query = torch.tensor([[3.0, 2.0, 1.0]])  # not normalised: the gate normalises
    cos = [3 / math.sqrt(14), 2 / math.sqrt(14), 1 / math.sqrt(14)]
    for top_k, temperature in ((2, 0.1), (2, 1.0), (3, 0.5), (1, 0.1)):
        (decision,) = CentroidGate(top_k=top_k, temperature=temperature).decide(_bank3(), query)
        expected = _softmax(cos[:top_k], temperature)
        assert [i for i, _ in decision.routes] == list(range(top_k))
        assert [w for _, w in decision.routes] == pytest.approx(expected, rel=1e-6)
        assert sum(w for _, w in decision.routes) == pytest.approx(1.0)
    sharp = CentroidGate(temperature=0.01).decide(_bank3(), query)[0].routes[0][1]
    soft = CentroidGate(temperature=1.0).decide(_bank3(), query)[0].routes[0][1]
    assert sharp > 0.99 > 0.6 > soft


def test_centroid_decides_each_row_on_its_own() -> None:
    queries = torch.tensor([[0.0, 0.1, 1.0], [1.0, 0.2, 0.0], [0.0, 1.0, 0.9]])  # [batch, hidden]
    decisions = CentroidGate(top_k=2).decide(_bank3(), queries)
    assert [[i for i, _ in d.routes] for d in decisions] == [[2, 1], [0, 1], [1, 2]]
    assert len(CentroidGate().decide(_bank3(), queries[:1])) == 1
    with pytest.raises(ValidationError):
        CentroidGate().decide(_bank3(), torch.zeros(3))  # not [batch, hidden]


def test_centroid_skips_members_without_a_usable_key() -> None:
    members = [member(0, key=None), member(1, key=KEYS[1]), member(2, key=(1.0, 0.0)), member(3, key=KEYS[2])]
    (decision,) = CentroidGate(top_k=3).decide(user_bank(members), torch.tensor([[1.0, 1.0, 0.0]]))
    assert [i for i, _ in decision.routes] == [1, 3]  # no key / a 2-d key from another backbone: not scored
    keyless = [member(0, key=None, kind="task"), member(1, key=None), member(2, key=None)]
    (decision,) = CentroidGate(top_k=2).decide(user_bank(keyless), torch.tensor([[1.0, 0.0, 0.0]]))
    assert decision.routes == ((1, 0.5), (2, 0.5))  # only personal adapters, equally
    (decision,) = CentroidGate().decide(user_bank(keyless[:1]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert decision.is_base_only
    assert CentroidGate().decide(user_bank([]), torch.ones(2, 3)) == [GateDecision(), GateDecision()]


def test_a_new_member_joins_the_centroid_gate_without_retraining() -> None:
    query = torch.tensor([[0.1, 0.0, 1.0]])
    two = user_bank([member(0, key=KEYS[0]), member(1, key=KEYS[1])])
    assert CentroidGate(top_k=1).decide(two, query)[0].routes[0][0] == 0
    three = user_bank([member(0, key=KEYS[0]), member(1, key=KEYS[1]), member(2, key=KEYS[2])])
    assert three.revision != two.revision
    assert CentroidGate(top_k=1).decide(three, query)[0].routes == ((2, 1.0),)


def test_fixed_gate_applies_the_tenants_weights_by_name() -> None:
    members = [
        member(0, key=None, name="style"),
        member(1, key=None, kind="task", name="style"),
        member(2, key=None, kind="task", name="summarise"),
    ]
    bank = user_bank(members)
    gate = FixedGate(weights={"style": 0.7, "task:style": 0.2, "summarise": 0.1, "missing": 5.0})
    decisions = gate.decide(bank, torch.zeros(2, 4))
    assert decisions[0] == decisions[1]
    assert decisions[0].routes == ((0, 0.7), (1, 0.2), (2, 0.1))
    assert FixedGate(weights={"style": 1.0, "summarise": 0.0}).decision(bank).routes == ((0, 1.0),)
    assert FixedGate(weights={"personal:summarise": 1.0}).decision(bank).is_base_only
    assert bank.describe(decisions[0]) == [("style", 0.7), ("style", 0.2), ("summarise", 0.1)]
    for bad in ({}, {"style": -1.0}, {"style": float("nan")}, {"": 1.0}):
        with pytest.raises(ValidationError):
            FixedGate(weights=bad)


def test_gate_spec_checks_values_and_round_trips_through_json() -> None:
    spec = GateSpec(kind="fixed", fixed_weights={"b": 0.5, "a": 0.5})
    assert GateSpec.from_json(spec.to_json()) == spec and hash(GateSpec.from_json(spec.to_json())) == hash(
        spec
    )
    assert GateSpec.from_json({"top_k": 3}) == GateSpec(top_k=3)
    bad_specs = [
        {"kind": "random"},
        {"top_k": 0},
        {"top_k": True},
        {"temperature": 0.0},
        {"temperature": float("inf")},
        {"kind": "fixed"},
        {"fixed_weights": {"a": 1.0}},
        {"learned_version_id": 3},
        {"kind": "learned", "learned_version_id": 0},
        {"colour": "red"},
    ]
    for bad in bad_specs:
        with pytest.raises(ValidationError):
            GateSpec.from_json(bad)


def _learned(adapter_ids: tuple[int, ...], weight: torch.Tensor) -> LearnedGateModel:
    network = GateNetwork(hidden_size=3, n_classes=len(adapter_ids), arch="linear", width=4)
    layer = network.layers
    assert isinstance(layer, torch.nn.Linear)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    names = tuple(f"a{i}" for i in adapter_ids)
    return LearnedGateModel(network, adapter_ids, names, 3, "linear", 4)


def test_learned_gate_uses_its_softmax_and_defers_to_the_centroid_for_unknown_members() -> None:
    bank = _bank3()
    ids = tuple(m.adapter_id for m in bank.members)
    weight = torch.tensor([[0.0, 0.0, 4.0], [0.0, 4.0, 0.0], [4.0, 0.0, 0.0]])  # class c <- feature 2-c
    gate = LearnedGate(model=_learned(ids, weight), top_k=2, fallback=CentroidGate(top_k=1))
    query = torch.tensor([[1.0, 0.0, 0.0]])
    (decision,) = gate.decide(bank, query)
    logits = [4.0, 0.0]  # classes 2 then 0 or 1 (tied at 0)
    assert decision.routes[0][0] == 2 and [w for _, w in decision.routes] == pytest.approx(
        _softmax(logits, 1.0)
    )

    shrunk = user_bank(list(bank.members[1:]))  # a member left the bank: its class is masked out
    (decision,) = gate.decide(shrunk, query)
    assert decision.routes[0][0] == 1 and shrunk.members[1].adapter_id == ids[2]
    grown = user_bank([*bank.members, member(3, key=(0.0, 0.0, -1.0))])  # unknown member: centroid decides
    assert gate.decide(grown, query) == CentroidGate(top_k=1).decide(grown, query)
    assert LearnedGate(model=None, top_k=2, fallback=CentroidGate()).decide(
        bank, query
    ) == CentroidGate().decide(bank, query)


def test_build_gate_picks_the_gate_of_the_spec() -> None:
    assert isinstance(build_gate(GateSpec()), CentroidGate)
    assert isinstance(build_gate(GateSpec(kind="fixed", fixed_weights={"a": 1.0})), FixedGate)
    untrained = build_gate(GateSpec(kind="learned"))
    assert isinstance(untrained, LearnedGate) and untrained.model is None
    with pytest.raises(ValidationError):
        build_gate(GateSpec(kind="learned", learned_version_id=7))
    model = _learned((100, 101, 102), torch.eye(3))
    loaded = build_gate(GateSpec(kind="learned", learned_version_id=7), load_learned=lambda v: model)
    assert isinstance(loaded, LearnedGate) and loaded.model is model


def test_plan_from_decisions_maps_members_to_each_rows_slots() -> None:
    decisions = [GateDecision(((0, 0.75), (1, 0.25))), GateDecision(), GateDecision(((1, 1.0),))]
    plan = plan_from_decisions(decisions, [[4, 2], [0], [7, 5]])  # rows of different users, own slot maps
    assert plan.batch_size == 3 and plan.used_slots == (2, 4, 5)
    assert plan.slot_ids.tolist() == [[2, 4], [-1, -1], [5, -1]]
    assert plan.weights.tolist() == [[0.25, 0.75], [0.0, 0.0], [1.0, 0.0]]
    with pytest.raises(ValidationError):
        plan_from_decisions(decisions, [[0, 1]])


def test_gates_say_when_their_decisions_do_not_need_embeddings() -> None:
    zeros = torch.zeros(2, 3)  # what a caller passes when it skips the embedding forward
    one_key = user_bank([member(0, key=KEYS[0]), member(1, key=None)])
    centroid = CentroidGate()
    assert centroid.needs_embeddings(_bank3()) and not centroid.needs_embeddings(one_key)
    assert centroid.decide(one_key, zeros) == [GateDecision(((0, 1.0),))] * 2
    assert not FixedGate(weights={"adapter-0": 1.0}).needs_embeddings(_bank3())
    model = _learned((100, 101, 102), torch.eye(3))
    assert LearnedGate(model=model, top_k=2, fallback=centroid).needs_embeddings(_bank3())
    assert not LearnedGate(model=None, top_k=2, fallback=centroid).needs_embeddings(one_key)


def test_a_prompt_nearer_a_general_prompt_than_any_member_is_served_by_the_base() -> None:
    general = [(0.0, 0.0, 1.0), (0.0, 0.6, 0.8)]  # two general prompts' embeddings
    bank = user_bank([member(0, key=KEYS[0]), member(1, key=KEYS[1])])
    gate = CentroidGate(top_k=2, general=general)
    queries = torch.tensor([[1.0, 0.2, 0.1], [0.1, 0.2, 1.0], [0.0, 1.0, 0.3], [0.0, 0.6, 0.8]])
    decisions = gate.decide(bank, queries)
    assert [i for i, _ in decisions[0].routes] == [0, 1]  # nearer adapter-0 than any general prompt
    assert decisions[1] == GateDecision()  # nearest a general prompt: the base alone
    assert [i for i, _ in decisions[2].routes] == [1, 0]
    assert decisions[3] == GateDecision()  # the second general prompt itself
    # the margin: a prompt as near a general prompt as to a member stays with the member
    tie = torch.tensor([[0.0, 1.0, 1.0]])  # cos 0.707 to adapter-1 and to general[0]; 0.99 to general[1]
    assert gate.decide(bank, tie) == [GateDecision()]
    exact_tie = CentroidGate(general=[(0.0, 0.0, 1.0)]).decide(bank, torch.tensor([[0.0, 1.0, 1.0]]))
    assert exact_tie[0].routes and exact_tie[0].routes[0][0] == 1
    assert GENERAL_MARGIN > 0
    # without general prompts the same prompt goes to the adapters, as before
    assert CentroidGate(top_k=2).decide(bank, queries[1:2])[0].routes
    # a bank of one keyed adapter now has a choice to make (adapter or base), so it needs embeddings
    one = user_bank([member(0, key=KEYS[0])])
    assert gate.needs_embeddings(one) and not CentroidGate().needs_embeddings(one)
    assert gate.decide(one, torch.tensor([[0.1, 0.0, 1.0]])) == [GateDecision()]
    assert gate.decide(one, torch.tensor([[1.0, 0.0, 0.1]]))[0].routes == ((0, 1.0),)
    # general embeddings of another hidden size (another backbone) are ignored, never an error
    assert CentroidGate(general=[(1.0, 0.0)]).decide(one, queries[1:2])[0].routes == ((0, 1.0),)
    # build_gate hands them to centroid gates and to a learned gate's centroid fallback
    assert build_gate(GateSpec(), general=general).decide(bank, queries[1:2]) == [GateDecision()]


def test_the_backbone_common_direction_is_left_out_of_centroid_scores() -> None:
    """Embeddings that share one large direction (as a pretrained model's do) differ by a few hundredths in
    cosine, so softmax splits a request almost evenly; without that direction the nearer key wins clearly."""
    common = torch.tensor([0.0, 0.0, 1.0])
    keys = ((0.3, 0.0, 1.0), (0.0, 0.3, 1.0))  # two adapters: cosine 0.92 to each other
    bank = user_bank([member(0, key=keys[0]), member(1, key=keys[1])])
    query = torch.tensor([[0.25, 0.05, 1.0]])  # nearer adapter-0
    plain = CentroidGate(top_k=2, temperature=0.1).decide(bank, query)[0].routes
    without = CentroidGate(top_k=2, temperature=0.1, common=common).decide(bank, query)[0].routes
    assert plain[0][0] == without[0][0] == 0
    assert plain[0][1] < 0.65  # an almost even split
    # what is left: (0.25, 0.05) against (1, 0) and (0, 1): cosines 0.98 and 0.20
    cos = [0.25 / math.hypot(0.25, 0.05), 0.05 / math.hypot(0.25, 0.05)]
    assert without[0][1] == pytest.approx(_softmax(cos, 0.1)[0], abs=1e-5) and without[0][1] > 0.99
    # the length of the direction and of a stored key do not matter (a projection, not a subtraction)
    scaled = user_bank([member(0, key=tuple(2 * v for v in keys[0])), member(1, key=keys[1])])
    assert _close(CentroidGate(temperature=0.1, common=5 * common).decide(scaled, query)[0].routes, without)
    # a direction of another hidden size (another backbone) is ignored, as general embeddings are
    assert _close(CentroidGate(temperature=0.1, common=torch.ones(5)).decide(bank, query)[0].routes, plain)
    # build_gate hands it to centroid gates and to a learned gate's centroid fallback
    spec = GateSpec(temperature=0.1)
    assert _close(build_gate(spec, common=common).decide(bank, query)[0].routes, without)
    learned = build_gate(GateSpec(kind="learned", temperature=0.1), common=common)
    assert _close(learned.decide(bank, query)[0].routes, without)


def _close(routes: tuple[tuple[int, float], ...], expected: tuple[tuple[int, float], ...]) -> bool:
    return [i for i, _ in routes] == [i for i, _ in expected] and [w for _, w in routes] == pytest.approx(
        [w for _, w in expected]
    )


def test_common_direction_is_the_unit_mean() -> None:
    direction = common_direction(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert direction.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    with pytest.raises(ValidationError):
        common_direction(torch.zeros(0, 4))


def test_a_key_of_several_vectors_scores_a_prompt_by_its_nearest_vector() -> None:
    # member 0 covers two topics (x and y): its mean (x + y) / sqrt(2) scores a pure-y prompt 0.71, below member
    # 1's key (0.8 y + 0.6 z: 0.8); with both of member 0's vectors kept, the prompt's cosine to it is 1
    two_topics = (*KEYS[0], *KEYS[1])  # two vectors, flattened
    other = (0.0, 0.8, 0.6)
    query = torch.tensor([[0.0, 1.0, 0.0]])
    bank = user_bank([member(0, key=two_topics), member(1, key=other)])
    (decision,) = CentroidGate(top_k=2, temperature=0.1).decide(bank, query)
    assert [i for i, _ in decision.routes] == [0, 1]
    assert [w for _, w in decision.routes] == pytest.approx(_softmax([1.0, 0.8], 0.1), rel=1e-6)
    mean = tuple(v / math.sqrt(2) for v in (1.0, 1.0, 0.0))
    (old,) = CentroidGate(top_k=1).decide(user_bank([member(0, key=mean), member(1, key=other)]), query)
    assert old.routes == ((1, 1.0),)  # one mean vector: the other member wins
    # keys of different lengths in one bank; a length that is no multiple of hidden is not scored
    mixed = user_bank([member(0, key=two_topics), member(1, key=KEYS[2]), member(2, key=(1.0,) * 4)])
    (decision,) = CentroidGate(top_k=3).decide(mixed, torch.tensor([[0.0, 0.0, 1.0]]))
    assert [i for i, _ in decision.routes] == [1, 0]


def test_several_vectors_also_beat_the_base_side_for_their_own_topics() -> None:
    general = torch.tensor([[0.3, 0.9, 0.3]])  # a general prompt near member 0's second topic
    query = torch.tensor([[0.0, 1.0, 0.05]])  # a question on member 0's second topic
    mean = tuple(v / math.sqrt(2) for v in (1.0, 1.0, 0.0))
    alone = CentroidGate(general=general).decide(user_bank([member(0, key=mean)]), query)[0]
    assert alone.is_base_only  # the mean of two topics is farther than the general prompt
    kept = CentroidGate(general=general).decide(user_bank([member(0, key=(*KEYS[0], *KEYS[1]))]), query)[0]
    assert kept.routes == ((0, 1.0),)


def test_key_vectors_summarise_clusters_deterministically() -> None:
    torch.manual_seed(0)
    centres = torch.eye(4)[:3]  # three topics in 4-d
    points = torch.cat([c + 0.05 * torch.randn(10, 4) for c in centres])  # [30, 4]
    one = key_vectors(points, 1)
    assert one.shape == (1, 4)
    unit = torch.nn.functional.normalize(points, dim=-1)
    assert one[0] == pytest.approx(torch.nn.functional.normalize(unit.mean(0), dim=0), abs=1e-6)
    three = key_vectors(points, 3)
    assert three.shape == (3, 4) and torch.allclose(three.norm(dim=1), torch.ones(3))
    assert sorted(int(v.argmax()) for v in three) == [0, 1, 2]  # one vector per topic
    assert torch.equal(three, key_vectors(points, 3))  # no seed, same answer
    assert key_vectors(points[:2], 8).shape[0] == 2  # never more vectors than points
    assert key_vectors(torch.cat([points[:1]] * 5), 8).shape[0] == 1  # duplicates are one point
    for bad in (torch.zeros(0, 4), torch.zeros(4)):
        with pytest.raises(ValidationError):
            key_vectors(bad, 2)
    with pytest.raises(ValidationError):
        key_vectors(points, 0)
