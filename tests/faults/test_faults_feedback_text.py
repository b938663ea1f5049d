"""NUL in feedback text (finding 2 of issue 18), on PostgreSQL.

PostgreSQL's ``json`` column stores ``"\\u0000"``, but its operators cannot read it back: once one such record is
stored, ``payload->>'prompt'`` over the table fails for every tenant. A record with NUL in any of its strings is
refused with 422 naming the field, and the batch stores nothing.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_helpers import ApiServer, Library, TenantHandle, sft
from sqlalchemy import text

#: (record, the field the 422 names)
NUL_RECORDS: list[tuple[dict[str, Any], str]] = [
    (sft("before\x00after"), "records[1].prompt"),
    (sft("fine", "an\x00answer"), "records[1].completion"),
    (
        {
            "kind": "sft",
            "messages": [{"role": "user", "content": "hi\x00"}, {"role": "assistant", "content": "hello"}],
        },
        "records[1].messages[0].content",
    ),
    ({"kind": "preference", "prompt": "p", "chosen": "a\x00", "rejected": "b"}, "records[1].chosen"),
    ({"kind": "rating", "prompt": "p", "response": "r\x00", "score": 0.5}, "records[1].response"),
    ({**sft("fine"), "metadata": {"session": "s\x00"}}, "records[1].metadata"),
    ({**sft("fine"), "metadata": {"k\x00": 1}}, "records[1].metadata"),
]


@pytest.mark.postgres
@pytest.mark.parametrize("route", ["/v1/users/nul-user/feedback", "/v1/tasks/nul-task/feedback"])
def test_nul_in_feedback_text_is_refused_naming_the_field_and_stores_nothing(
    api: ApiServer, tenant: TenantHandle, library: Library, route: str
) -> None:
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    with httpx.Client(base_url=api.url, headers=headers) as http:
        for record, field in NUL_RECORDS:
            answer = http.post(route, json={"records": [sft("a good record"), record]})
            assert answer.status_code == 422, (record, answer.text)
            error = answer.json()["error"]
            assert (error["code"], error["field"]) == ("validation_error", field), answer.text
            assert "NUL" in error["message"]
        assert http.get(route).status_code == 404  # the batch stored nothing (the subject was not even made)
        assert http.post(route, json={"records": [sft("tab\tand\nnewline are fine")]}).status_code == 200
    assert library.db.dialect == "postgresql"
    with library.db.session() as session:  # the operators that a stored NUL breaks read every row
        prompts = session.execute(text("SELECT payload->>'prompt' FROM feedback")).scalars().all()
    assert "tab\tand\nnewline are fine" in prompts
