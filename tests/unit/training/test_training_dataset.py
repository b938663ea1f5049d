"""Datasets from feedback: kind rules, the content-hash holdout split, replay sampling, encoding."""

from __future__ import annotations

import hashlib
from collections import Counter
from types import SimpleNamespace

import pytest

from lorafleet.backbone import build_tiny_tokenizer
from lorafleet.errors import ValidationError
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import (
    IGNORE_INDEX,
    Example,
    build_dataset,
    encode_example,
    encode_examples,
    is_holdout,
    reservoir_sample,
)

NO_HOLDOUT = TrainingConfig(holdout_fraction=0.0)


def test_kind_rules(helpers: SimpleNamespace) -> None:
    raws = [
        {"kind": "sft", "prompt": "p1", "completion": "c1"},
        {"kind": "preference", "prompt": "p2", "chosen": "good", "rejected": "bad"},
        {"kind": "rating", "prompt": "p3", "response": "r3", "score": 0.9},
        {"kind": "rating", "prompt": "p4", "response": "r4", "score": 0.5},  # at the threshold: kept
        {"kind": "rating", "prompt": "p5", "response": "r5", "score": 0.49},
        {"kind": "rating", "prompt": "p6", "response": "r6", "score": 0},
    ]
    records = [helpers.make_record(raw, record_id=i + 1) for i, raw in enumerate(raws)]
    dataset = build_dataset(records, config=NO_HOLDOUT)
    assert dataset.holdout == ()
    assert dataset.train == (
        Example(1, "p1", "c1", "sft"),
        Example(2, "p2", "good", "preference", rejected="bad"),
        Example(3, "p3", "r3", "rating"),
        Example(4, "p4", "r4", "rating"),
    )
    assert dataset.excluded == {"rating_below_threshold": 2}
    strict = build_dataset(records, config=TrainingConfig(holdout_fraction=0.0, rating_threshold=0.95))
    assert [e.record_id for e in strict.train] == [1, 2]
    assert strict.excluded == {"rating_below_threshold": 4}


def test_ratings_of_one_prompt_pair_up_when_the_job_trains_preferences(helpers: SimpleNamespace) -> None:
    raws = [
        {"kind": "rating", "prompt": "p", "response": "great", "score": 0.9},
        {"kind": "rating", "prompt": "p", "response": "meh", "score": 0.3},
        {"kind": "rating", "prompt": "p", "response": "awful", "score": 0.1},  # the lowest: the rejected one
        {"kind": "rating", "prompt": "p", "response": "fine", "score": 0.6},
        {"kind": "rating", "prompt": "q", "response": "bad", "score": 0.2},  # nothing to pair with
        {"kind": "rating", "prompt": "r", "response": "good", "score": 0.8},  # no low rating: SFT as before
    ]
    records = [helpers.make_record(raw, record_id=i + 1) for i, raw in enumerate(raws)]
    dpo = build_dataset(records, config=NO_HOLDOUT.with_changes(dpo_weight=1.0))
    assert dpo.train == (
        Example(1, "p", "great", "rating", rejected="awful"),
        Example(4, "p", "fine", "rating", rejected="awful"),
        Example(6, "r", "good", "rating"),
    )
    assert dpo.excluded == {"rating_below_threshold": 2, "rating_paired": 1}
    sft = build_dataset(records, config=NO_HOLDOUT)  # DPO off: ratings keep their SFT rule
    assert [e.rejected for e in sft.train] == [None, None, None]
    assert sft.excluded == {"rating_below_threshold": 3}


def test_duplicates_and_malformed_records_are_counted_not_raised(helpers: SimpleNamespace) -> None:
    good = helpers.make_record({"kind": "sft", "prompt": "p", "completion": "c"}, record_id=1)
    repeat = helpers.make_record({"kind": "sft", "prompt": "p", "completion": "c"}, record_id=2)
    broken = helpers.make_record({"kind": "sft", "prompt": "q", "completion": "d"}, record_id=3)
    broken.payload.pop("completion")
    odd = helpers.make_record({"kind": "sft", "prompt": "r", "completion": "e"}, record_id=4)
    object.__setattr__(odd, "kind", "essay")
    dataset = build_dataset([good, repeat, broken, odd], config=NO_HOLDOUT)
    assert [e.record_id for e in dataset.train] == [1]
    assert dataset.excluded == {"duplicate": 1, "malformed": 1, "unknown_kind": 1}


def test_holdout_split_is_by_content_hash_and_stable_when_records_are_added(helpers: SimpleNamespace) -> None:
    raws = [{"kind": "sft", "prompt": f"prompt {i}", "completion": f"answer {i}"} for i in range(400)]
    records = [helpers.make_record(raw, record_id=i + 1) for i, raw in enumerate(raws)]
    config = TrainingConfig(holdout_fraction=0.2)
    early = build_dataset(records[:150], config=config)
    late = build_dataset(records, config=config)
    late_holdout = {e.record_id for e in late.holdout}
    assert {e.record_id for e in early.holdout} == {i for i in late_holdout if i <= 150}
    assert 0.13 < len(late.holdout) / len(records) < 0.27
    reordered = build_dataset(list(reversed(records)), config=config)
    assert {e.record_id for e in reordered.holdout} == late_holdout  # order of arrival does not matter
    same_text_other_ids = [helpers.make_record(raw, record_id=1000 + i) for i, raw in enumerate(raws)]
    assert {e.prompt for e in build_dataset(same_text_other_ids, config=config).holdout} == {
        e.prompt for e in late.holdout
    }


def test_is_holdout_edges() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    assert not any(is_holdout(h, 0.0) for h in hashes)
    assert all(is_holdout(h, 1.0) for h in hashes)
    share = sum(is_holdout(h, 0.3) for h in hashes) / len(hashes)
    assert 0.26 < share < 0.34
    assert [is_holdout(h, 0.3) for h in hashes] == [is_holdout(h, 0.3) for h in hashes]
    with pytest.raises(ValidationError):
        is_holdout(hashes[0], 1.5)


def test_reservoir_sample() -> None:
    items = list(range(100))
    sample = reservoir_sample(items, 10, seed=3)
    assert len(sample) == 10 and len(set(sample)) == 10 and sample == sorted(sample)  # input order kept
    assert reservoir_sample(items, 10, seed=3) == sample
    assert reservoir_sample(items, 10, seed=4) != sample
    assert reservoir_sample(items, 500, seed=0) == items
    assert reservoir_sample(items, 0, seed=0) == []
    assert reservoir_sample([], 5, seed=0) == []
    with pytest.raises(ValidationError):
        reservoir_sample(items, -1, seed=0)
    counts = Counter(x for seed in range(2000) for x in reservoir_sample(list(range(10)), 3, seed=seed))
    assert all(500 < counts[x] < 700 for x in range(10))  # uniform: each item 3/10 of 2000 = 600 times


def test_encode_left_pads_and_labels_only_the_completion() -> None:
    tokenizer = build_tiny_tokenizer()
    examples = [Example(1, "Q: ab? A: ", "xy\n", "sft"), Example(2, "Q? ", "long answer", "sft")]
    batch = encode_examples(tokenizer, examples, max_seq_len=64)
    prompt0 = tokenizer("Q: ab? A: ")["input_ids"]
    completion0 = tokenizer("xy\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    width = batch.input_ids.shape[1]
    assert width == len("Q? ") + len("long answer") + 1  # the longer row, no padding
    row0 = batch.input_ids[0].tolist()
    pad = width - len(prompt0) - len(completion0)
    assert row0 == [tokenizer.pad_token_id] * pad + prompt0 + completion0  # left padding
    assert batch.attention_mask[0].tolist() == [0] * pad + [1] * (width - pad)
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * (width - len(completion0)) + completion0
    assert (batch.labels[1] != IGNORE_INDEX).sum() == len("long answer") + 1  # + EOS
    without_eos = encode_examples(tokenizer, examples[:1], max_seq_len=64, add_eos=False)
    assert without_eos.labels[0, -1] == completion0[-2]
    with pytest.raises(ValidationError):
        encode_examples(tokenizer, [], max_seq_len=64)


def test_encode_truncates_the_prompt_from_the_left_first() -> None:
    tokenizer = build_tiny_tokenizer()
    ids, n_completion = encode_example(tokenizer, Example(1, "x" * 50 + "END", "abc", "sft"), max_seq_len=20)
    assert len(ids) == 20 and n_completion == 4
    assert tokenizer.decode(ids[:16]).endswith("END")
    ids, n_completion = encode_example(tokenizer, Example(1, "p" * 50, "c" * 50, "sft"), max_seq_len=20)
    assert len(ids) == 20 and n_completion == 10  # a long completion keeps half of the window
    assert tokenizer.decode(ids[10:]) == "c" * 10
