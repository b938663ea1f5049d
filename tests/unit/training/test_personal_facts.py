"""Personal facts: seeded and deterministic, phrasings split without overlap, values distinct, judges, records."""

from __future__ import annotations

import pytest

from lorafleet.errors import ValidationError
from lorafleet.feedback import validate_feedback_batch
from lorafleet.training import personal_facts as pf
from lorafleet.training.dataset import Example


def test_tables_cover_three_rounds_of_four_kinds_for_sixteen_users() -> None:
    assert len(pf.ROUNDS) >= 3 and all(len(kinds) >= 4 for kinds in pf.ROUNDS)
    for kind in pf.KINDS:
        assert len(set(kind.values)) >= pf.MAX_USERS, kind.name
        assert len(set(kind.questions)) >= 12, kind.name
        assert len(kind.answers) >= 2 and all("{v}" in a or "{V}" in a for a in kind.answers)
    values = [v.lower() for kind in pf.KINDS for v in kind.values]
    assert len(values) == len(set(values)), "a value must name one kind only"
    questions = [q for kind in pf.KINDS for q in kind.questions]
    assert len(questions) == len(set(questions)), "a question must belong to one kind only"


def test_no_value_matches_inside_another_value_or_a_question() -> None:
    facts = [pf.Fact("u", k.name, v, k.round) for k in pf.KINDS for v in k.values]
    for fact in facts:
        assert not any(pf.answer_has_fact(other.value, fact) for other in facts if other is not fact)
        assert not any(pf.answer_has_fact(q, fact) for k in pf.KINDS for q in k.questions)


def test_users_are_deterministic_and_distinct_per_kind() -> None:
    assert pf.make_users(16, seed=3) == pf.make_users(16, seed=3)
    assert pf.make_users(16, seed=3) != pf.make_users(16, seed=4)
    users = pf.make_users(16)
    for kind in pf.KINDS:
        values = [u.fact(kind.name).value for u in users]
        assert len(set(values)) == 16, kind.name
    assert pf.make_users(4) == pf.make_users(16)[:4]  # more users never change the first ones
    with pytest.raises(ValidationError):
        pf.make_users(pf.MAX_USERS + 1)


def test_train_and_eval_phrasings_are_disjoint_and_deterministic() -> None:
    for kind in pf.KINDS:
        for seed in (0, 1, 2):
            train, held = pf.split_questions(kind.name, seed=seed)
            assert len(train) == pf.TRAIN_PHRASINGS and len(held) >= 4
            assert not set(train) & set(held)
            assert set(train) | set(held) == set(kind.questions)
            assert pf.split_questions(kind.name, seed=seed) == (train, held)
    assert pf.split_questions("pet_name", seed=0) != pf.split_questions("pet_name", seed=1)


def test_records_are_valid_feedback_and_state_the_fact() -> None:
    user = pf.make_users(2)[1]
    train = pf.fact_records(user, rounds=[1], split="train")
    held = pf.fact_records(user, rounds=[1], split="eval")
    assert len(train) == 4 * pf.TRAIN_PHRASINGS
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    validate_feedback_batch(train + held)
    for record in train + held:
        fact = user.fact(record["metadata"]["fact"])
        assert record["kind"] == "sft" and pf.answer_has_fact(record["completion"], fact)
        assert pf.fact_of_question(record["prompt"]) == fact.kind
    examples = pf.user_examples(user, rounds=[1, 2], split="eval", first_id=10)
    assert all(isinstance(e, Example) for e in examples)
    assert [e.record_id for e in examples] == list(range(10, 10 + len(examples)))
    assert {pf.fact_of_question(e.prompt) for e in examples} == set(pf.round_kinds(1) + pf.round_kinds(2))


def test_answers_read_naturally() -> None:
    fact = pf.Fact("u", "pet_species", "iguana", 2)
    assert pf.answer_for(fact, 0) == "Your pet is an iguana."
    assert pf.answer_for(pf.Fact("u", "pet_name", "Biscuit", 1)) == "Your pet is called Biscuit."
    assert pf.answer_for(pf.Fact("u", "sport", "curling", 1), 2) == "Curling is your favourite sport."


def test_answer_has_fact_is_case_insensitive_and_whole_word() -> None:
    dog = pf.Fact("u", "pet_name", "Biscuit", 1)
    assert pf.answer_has_fact("your pet is BISCUIT!", dog)
    assert not pf.answer_has_fact("Biscuits are tasty.", dog)
    assert not pf.answer_has_fact("I don't know your pet's name.", dog)
    diet = pf.Fact("u", "diet", "gluten-free", 1)
    assert pf.answer_has_fact("You eat gluten free.", diet) and pf.answer_has_fact("Gluten-free, yes.", diet)
    assert not pf.answer_has_fact("gluten is a protein", diet)


def test_personal_values_in_names_the_users_whose_values_appear() -> None:
    users = pf.make_users(3)
    a, b = users[0], users[1]
    text = f"The capital is {b.fact('home_city').value}; also {a.fact('pet_name').value.lower()}."
    assert pf.personal_values_in(text, users) == {a.key: ("pet_name",), b.key: ("home_city",)}
    assert pf.personal_values_in("The capital of France is Paris.", users) == {}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValidationError):
        pf.round_kinds(0)
    with pytest.raises(ValidationError):
        pf.split_questions("shoe_size")
    with pytest.raises(ValidationError):
        pf.fact_records(pf.make_users(1)[0], rounds=[1], split="holdout")
    with pytest.raises(ValidationError):
        pf.fact_of_question("What is the capital of France?")
