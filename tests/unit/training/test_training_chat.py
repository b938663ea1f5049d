"""Training renders as serving does: ``messages`` feedback becomes an example whose context is the turns before
its target, encoded with the backbone's chat template (the plain format on tiny) and ended by the end-of-turn
token; prompt/completion examples on tiny keep their exact ids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from lorafleet.backbone import resolve_backbone_path
from lorafleet.config import SMOLLM2_BACKBONE
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, build_dataset, encode_example, encode_prompt

NO_HOLDOUT = TrainingConfig(holdout_fraction=0.0)
MESSAGES = [
    {"role": "developer", "content": "Answer like a pirate."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Ahoy!"},
    {"role": "user", "content": "Where is the treasure?"},
    {"role": "assistant", "content": "Buried on the island, matey."},
]
CONTEXT = (
    ("system", "Answer like a pirate."),
    ("user", "Hi"),
    ("assistant", "Ahoy!"),
    ("user", "Where is the treasure?"),
)
TARGET = "Buried on the island, matey."


@pytest.fixture
def conversation_example(helpers: SimpleNamespace) -> Example:
    record = helpers.make_record({"kind": "sft", "messages": MESSAGES}, record_id=7)
    (example,) = build_dataset([record], config=NO_HOLDOUT).train
    return example


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


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_data_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(resolve_backbone_path(SMOLLM2_BACKBONE, data_dir=smollm2_data_dir))


@pytest.mark.parametrize("with_context", [True, False])
def test_on_smollm2_an_example_is_its_chat_template_and_ends_with_im_end(
    smollm2_tokenizer: Any, conversation_example: Example, with_context: bool
) -> None:
    tok = smollm2_tokenizer
    example = conversation_example if with_context else Example(1, "Where is the treasure?", TARGET, "sft")
    conversation = [{"role": role, "content": content} for role, content in example.messages]
    ids, n = encode_example(tok, example, max_seq_len=1024)
    prompt = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    whole = tok.apply_chat_template(
        [*conversation, {"role": "assistant", "content": TARGET}], return_dict=True
    )["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[: len(ids) - n] == list(prompt) and ids[-1] == im_end
    assert ids == list(whole)[: len(ids)]  # what the template itself writes for the whole conversation
    assert (
        whole[len(ids) :] == tok("\n", add_special_tokens=False)["input_ids"]
    )  # only the template's newline left
