"""Training renders as serving does: ``messages`` feedback becomes an example whose context is the turns before
its target, encoded with the backbone's chat template (the plain format on tiny) and ended by the end-of-turn
token; prompt/completion examples on tiny keep their exact ids. SmolLM2's chat template is in the integration
tier (tests/integration/backbone/test_training_chat_smollm2.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from tests import feedback_records
from tests.feedback_records import CONTEXT, MESSAGES, NO_HOLDOUT, TARGET

from lorafleet.training.dataset import Example, build_dataset, encode_example, encode_prompt


@pytest.fixture
def conversation_example() -> Example:
    return feedback_records.conversation_example()


def test_a_messages_record_trains_its_last_assistant_turn(conversation_example: Example) -> None:
    assert conversation_example == Example(7, "Where is the treasure?", TARGET, "sft", context=CONTEXT)
    assert conversation_example.messages == CONTEXT
    assert Example(1, "p", "c", "sft").messages == (("user", "p"),)


def test_stored_conversations_that_are_not_trainable_count_as_malformed(helpers: SimpleNamespace) -> None:
    good = helpers.make_record({"kind": "sft", "messages": MESSAGES}, record_id=1)
    no_target = helpers.make_record({"kind": "sft", "messages": MESSAGES[:3]}, record_id=2)
    no_target.payload["messages"] = MESSAGES[:4]  # a row changed after ingestion
    bad_role = helpers.make_record({"kind": "sft", "messages": MESSAGES[1:3]}, record_id=3)
    bad_role.payload["messages"] = [{"role": "robot", "content": "x"}, MESSAGES[2]]
    dataset = build_dataset([good, no_target, bad_role], config=NO_HOLDOUT)
    assert [e.record_id for e in dataset.train] == [1] and dataset.excluded == {"malformed": 2}


def test_prompt_completion_on_tiny_encodes_exactly_as_before(tokenizer: Any) -> None:
    ids, n = encode_example(tokenizer, Example(1, "Q: ab? A: ", "xy\n", "sft"), max_seq_len=64)
    expected = tokenizer("Q: ab? A: ")["input_ids"] + tokenizer("xy\n", add_special_tokens=False)["input_ids"]
    assert ids == expected + [tokenizer.eos_token_id] and n == len("xy\n") + 1


def test_a_conversation_on_tiny_encodes_the_plain_format(
    tokenizer: Any, conversation_example: Example
) -> None:
    ids, n = encode_example(tokenizer, conversation_example, max_seq_len=512)
    text = (
        "system: Answer like a pirate.\nuser: Hi\nassistant: Ahoy!\nuser: Where is the treasure?\nassistant:"
    )
    target = tokenizer(TARGET, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encode_prompt(tokenizer, conversation_example) == tokenizer(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"] + target and n == len(target)
