"""Stored-looking feedback records for the tests, and the conversation the training tests encode on the tiny
backbone (unit tier) and on the real SmolLM2 (integration tier)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lorafleet.domain import FeedbackRecord
from lorafleet.feedback import prepare_record
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, build_dataset

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


def make_record(raw: dict[str, Any], *, record_id: int, user_id: int = 1) -> FeedbackRecord:
    """A stored-looking feedback record, validated and hashed as ingestion does."""
    prepared = prepare_record(raw, index=0)
    return FeedbackRecord(
        record_id, user_id, prepared.kind, prepared.payload, prepared.content_hash, datetime.now(UTC)
    )


def conversation_example() -> Example:
    """The training example ``MESSAGES`` (stored as record 7) becomes: its last assistant turn after ``CONTEXT``."""
    record = make_record({"kind": "sft", "messages": MESSAGES}, record_id=7)
    (example,) = build_dataset([record], config=NO_HOLDOUT).train
    return example
