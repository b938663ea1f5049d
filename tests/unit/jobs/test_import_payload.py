"""An ``import`` job names a task, or a user and their adapter (issue 19: a user's own adapter from PEFT); a task
import's stored payload and result keep the shape they had before."""

from __future__ import annotations

import pytest

from lorafleet.domain.jobs import ImportPayload, ImportResult
from lorafleet.errors import ValidationError

COMMON = {"archive_sha256": "a" * 64, "archive_size": 10, "example_prompts": ["Hi"], "actor": "api:t"}


def test_a_task_import_keeps_its_payload_and_result_shape() -> None:
    payload = ImportPayload.parse({"task": "tone", **COMMON})
    assert (payload.adapter_name, payload.target) == ("tone", "task 'tone'")
    assert payload.to_json() == {"task": "tone", **COMMON, "reason": ""}
    result = ImportResult(
        task="tone", adapter_id=1, version_id=2, number=1, parent_version_id=None, source_sha256="b"
    )
    assert set(result.to_json()) == {
        "task",
        "adapter_id",
        "version_id",
        "number",
        "parent_version_id",
        "source_sha256",
    }


def test_a_user_import_names_the_user_and_the_adapter() -> None:
    payload = ImportPayload.parse({"user": "ada", "adapter": "mine", **COMMON})
    assert (payload.task, payload.adapter_name, payload.target) == (
        None,
        "mine",
        "adapter 'mine' of user 'ada'",
    )
    assert ImportPayload.parse(payload.to_json()) == payload and "task" not in payload.to_json()


@pytest.mark.parametrize(
    "where",
    [{}, {"task": "tone", "user": "ada", "adapter": "mine"}, {"user": "ada"}, {"adapter": "mine"}],
)
def test_an_import_naming_no_target_or_two_is_refused(where: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="names a task, or a user and their adapter"):
        ImportPayload.parse({**where, **COMMON})
