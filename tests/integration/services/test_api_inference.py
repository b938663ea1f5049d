"""Generation through HTTP: the openai package's client against /v1/completions and /v1/chat/completions with
``user=``, /generate following promote and rollback (``served_by``), refused OpenAI options, /metrics, /readyz.

The session server serves the tiny backbone in fp32 (nf4 decoding is slower on CPU and not what is tested here);
adapter versions are real PEFT folders registered through the library, so no training is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import ApiServer, Library, LiveVersions, TenantHandle, live_personal_version, sft

from lorafleet.domain import JobKind
from lorafleet.qa.reports import store_document
from lorafleet.sdk import errors
from lorafleet.store.sql.qa_repository import NewQAReport, QARepository


def test_the_openai_client_calls_completions_and_chat_for_a_user(
    api: ApiServer, tenant: TenantHandle, live: LiveVersions
) -> None:
    live.personal("olga", 2)
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=tenant.api_key, max_retries=0)

    completion = client.completions.create(
        model="lorafleet", prompt="The weather today is", max_tokens=6, temperature=0, user="olga"
    )
    (choice,) = completion.choices
    assert completion.object == "text_completion" and completion.model == "lorafleet"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert completion.usage is not None and completion.usage.completion_tokens <= 6
    (served,) = (completion.model_extra or {})["lorafleet"]
    assert served["versions"] == {"personal": 1} and served["gate_weights"] == {"personal": 1.0}

    again = client.completions.create(
        model="lorafleet", prompt="The weather today is", max_tokens=6, temperature=0, user="olga"
    )
    assert again.choices[0].text == choice.text  # greedy: the same text
    base = client.completions.create(
        model="lorafleet", prompt=["a", "b", "c"], max_tokens=3, temperature=0, user="new"
    )
    assert [c.index for c in base.choices] == [0, 1, 2]
    assert [s["served_by"] for s in (base.model_extra or {})["lorafleet"]] == [[], [], []]

    chat = client.chat.completions.create(
        model="lorafleet",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        user="olga",
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert (chat.model_extra or {})["lorafleet"]["versions"] == {"personal": 1}


def test_generate_follows_promote_and_rollback_through_the_api(
    tenant: TenantHandle, live: LiveVersions
) -> None:
    client = tenant.client
    live.personal("pat", 3)
    live.personal("pat", 4)

    def served() -> dict[str, int]:
        return client.generate("pat", "Tell me a story", max_tokens=4).versions

    assert served() == {"personal": 2}
    event = client.rollback("pat", "personal", 1, reason="v2 regressed")
    assert (event.from_version, event.to_version, event.reason) == (2, 1, "v2 regressed")
    assert served() == {"personal": 1}
    client.rollback("pat", "personal", None)
    assert served() == {}
    with pytest.raises(errors.InvalidState):
        client.rollback("pat", "personal", None)  # nothing live to roll back from
    client.promote("pat", "personal", 2)
    assert served() == {"personal": 2}
    history = client.alias_history("pat", "personal")
    assert [(e.from_version, e.to_version) for e in history] == [
        (None, 1),
        (1, 2),
        (2, 1),
        (1, None),
        (None, 2),
    ]
    assert history[-1].actor == f"api:{tenant.name}"
    detail = client.get_version("pat", "personal", 2)
    assert detail.status == "live" and detail.qa_decision is None and detail.qa_reports == []
    assert [v.status for v in client.list_versions("pat", "personal")] == ["archived", "live"]


def test_generate_is_one_user_turn_unless_raw_and_chat_renders_the_plain_format_on_tiny(
    tenant: TenantHandle,
) -> None:
    client = tenant.client
    rendered = client.generate("uma", "Tell me a story", max_tokens=4)
    raw = client.generate("uma", "Tell me a story", max_tokens=4, raw=True)
    assert rendered.text == raw.text and rendered.usage == raw.usage  # tiny: a user turn is the prompt
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat("uma", messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and "\nuser:" not in chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len("system: Be brief.\nuser: Hi\nassistant:")  # one byte, one token


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "n": 17, "user": "u"}, "n"),
        ({"prompt": "x", "user": "u", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "user": "u", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "user": "u", "logit_bias": {"42": 5}}, "logit_bias"),
        ({"prompt": "x", "user": "u", "echo": True, "logprobs": 2}, "logprobs"),
        ({"prompt": "x", "user": "u", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "user": "u", "suffix": "!"}, "suffix"),
        ({"prompt": "x", "user": "u", "an_unknown_field": 1}, "an_unknown_field"),
        ({"prompt": "x", "user": "u", "temperature": 1e-40}, "temperature"),
        ({"prompt": "", "user": "u"}, "prompt"),
        ({"prompt": "x", "user": "u", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "user": "u", "top_p": 0}, "top_p"),
    ],
)
def test_unsupported_openai_options_are_422_naming_the_field_never_ignored(
    api: ApiServer, tenant: TenantHandle, body: dict[str, object], field: str
) -> None:
    answer = httpx.post(
        f"{api.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {tenant.api_key}"}
    )
    assert answer.status_code == 422 and answer.json()["error"]["field"] == field


def test_metrics_and_readiness_after_serving(
    api: ApiServer, tenant: TenantHandle, live: LiveVersions
) -> None:
    tenant.client.submit_feedback("quinn", [sft("q")])
    live.personal("quinn", 5)
    tenant.client.generate("quinn", "Hello", max_tokens=2)
    tenant.client.generate("quinn", "Hello again", max_tokens=2)

    ready = tenant.client.ready()
    assert ready.ready and ready.database == "ok" and ready.engine == "ready" and ready.workers == "off"
    assert tenant.client.health().status == "ok"
    page = httpx.get(f"{api.url}/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = page.text

    def value(pattern: str) -> float:
        found = re.search(rf"^{pattern} (\S+)$", text, flags=re.MULTILINE)
        assert found, pattern
        return float(found.group(1))

    route = re.escape('route="/v1/users/{user_id}/generate",status="200"')
    assert value(rf'lorafleet_http_requests_total\{{method="POST",{route}\}}') >= 2
    assert (
        value(
            r'lorafleet_http_request_duration_seconds_count\{method="POST",route="/v1/users/\{user_id\}/generate"\}'
        )
        >= 2
    )
    assert value(r'lorafleet_jobs\{state="queued"\}') >= 0
    assert value("lorafleet_engine_loaded") == 1
    assert value("lorafleet_serving_requests_total") >= 2
    for counter in ("hits", "misses", "loads"):  # the second request found the version's slot loaded
        assert value(f"lorafleet_adapter_cache_{counter}_total") >= 1
    assert value("lorafleet_prefix_cache_lookup_tokens_total") >= 1  # the prompts were looked up
    assert value("lorafleet_prefix_cache_bytes") >= 0
    assert "# TYPE lorafleet_http_requests_total counter" in text


def test_a_version_shows_its_latest_qa_decision_report_and_document(
    tenant: TenantHandle, library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    live_personal_version(library, tenant_id=tenant.id, user="rita", folder=adapter_folder(6))
    (version,) = tenant.client.list_versions("rita", "personal")
    repo = QARepository(dialect=library.db.dialect)
    for decision, note in (("keep", "first look"), ("reject", "regressed on the task set")):
        document = {"decision": decision, "reasons": [note]}
        blob = store_document(library.registry, document)
        new = NewQAReport(
            tenant_id=tenant.id,
            version_id=version.id,
            kind="candidate",
            policy_version="test-1",
            decision=decision,  # type: ignore[arg-type]
            reasons=(note,),
            summary={"cells": 1},
            blob_sha256=blob.sha256,
            blob_uri=blob.uri,
            blob_size_bytes=blob.size,
            job_id=None,
        )
        with library.db.session() as session:
            repo.insert_report(session, new=new)

    detail = tenant.client.get_version("rita", "personal", 1, qa_document=True)
    assert detail.qa_decision == "reject" and [r.decision for r in detail.qa_reports] == ["keep", "reject"]
    assert detail.qa_report is not None and detail.qa_report.reasons == ["regressed on the task set"]
    assert detail.qa_document == {"decision": "reject", "reasons": ["regressed on the task set"]}
    assert tenant.client.get_version("rita", "personal", 1).qa_document is None
    assert tenant.client.lineage("rita", "personal", 1).root.qa_decisions == ["keep", "reject"]


def _poisoned_copy(folder: Path, dest: Path) -> Path:
    """``folder`` with every lora_A and lora_B x 1e25: finite weights (the registry takes them), updates past 1e38
    whose products overflow float32, so the logits are not finite."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    weights = dest / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 1e25 for k, v in tensors.items()}, str(weights))
    return dest


def test_one_poisoned_request_among_eight_other_tenants_fails_alone_and_queues_a_recheck(
    api: ApiServer,
    make_tenant: Callable[[], TenantHandle],
    library: Library,
    adapter_folder: Callable[[int], Path],
    tmp_path: Path,
) -> None:
    """The issue's finding: a broken adapter's NaN, or an unusable sampling parameter, used to fail every request
    of its batch (3-8 of 8 got 500). Now the broken row fails alone, 20 rounds in a row, and QA is told."""

    mallory = make_tenant()
    live_personal_version(
        library,
        tenant_id=mallory.id,
        user="mallory",
        folder=_poisoned_copy(adapter_folder(3), tmp_path / "p"),
    )
    others = [make_tenant() for _ in range(8)]
    for i, tenant in enumerate(others):
        live_personal_version(library, tenant_id=tenant.id, user=f"user{i}", folder=adapter_folder(i % 2))

    def ask(tenant: TenantHandle, user: str, extra: dict[str, object] | None = None) -> httpx.Response:
        body = {
            "prompt": "The weather today is",
            "max_tokens": 4,
            "temperature": 0,
            "user": user,
            **(extra or {}),
        }
        headers = {"Authorization": f"Bearer {tenant.api_key}"}
        return httpx.post(f"{api.url}/v1/completions", json=body, headers=headers, timeout=120)

    expected = [ask(t, f"user{i}").json()["choices"][0]["text"] for i, t in enumerate(others)]
    with ThreadPoolExecutor(max_workers=9) as pool:
        for _ in range(20):
            poisoned = pool.submit(ask, mallory, "mallory")
            answers = list(pool.map(lambda i: ask(others[i], f"user{i}"), range(8)))
            assert [a.status_code for a in answers] == [200] * 8
            assert [
                a.json()["choices"][0]["text"] for a in answers
            ] == expected  # untouched by the broken row
            failed = poisoned.result()
            assert failed.status_code == 500, failed.text
            error = failed.json()["error"]
            assert error["code"] == "generation_failed" and "non-finite logits" in error["message"]
            assert "personal v1" in error["message"] and "QA recheck" in error["message"]

    # the user's live adapter is queued for a QA recheck (one job: the recheck's dedupe key covers all 21 reports)
    [recheck] = [j for j in library.queue.list_jobs(tenant_id=mallory.id) if j.kind == JobKind.QA]
    assert recheck.payload["recheck"]["cause"].startswith("serving: non-finite logits through personal v1")
    # sampling parameters that cannot be sampled from are refused before they reach a batch
    for field, value in (("temperature", 1e-40), ("top_p", 0.0)):
        refused = ask(mallory, "mallory", {"temperature": 1.0, field: value})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field


def test_models_base_pinned_and_task_models_and_optional_user_through_the_openai_client(
    api: ApiServer, tenant: TenantHandle, live: LiveVersions
) -> None:
    """``model`` says what serves a request: the user's experts (``lorafleet``), ``base``, a task adapter or a user's
    adapter, live or pinned at a version; ``GET /v1/models`` lists what is not per user; unknown models are
    404 ``model_not_found`` as in OpenAI; ``user`` may be left out (the base model)."""
    live.personal("pia", 4)
    live.personal("pia", 5)  # v2 is live
    live.task("summaries", 6)
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=tenant.api_key, max_retries=0)

    assert [m.id for m in client.models.list().data] == ["lorafleet", "base", "task:summaries"]

    def served(model: str, user: str | None = "pia") -> tuple[str, list[dict[str, object]]]:
        extra = {} if user is None else {"user": user}
        c = client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0, **extra)  # type: ignore[call-overload]
        (info,) = (c.model_extra or {})["lorafleet"]
        return c.choices[0].text, info["served_by"]

    base_text, by = served("base")
    assert by == [] and served("lorafleet", user=None) == (base_text, [])  # no user: the base model
    assert served("lorafleet", user="nobody-yet")[1] == []
    assert [(b["adapter"], b["version"]) for b in served("lorafleet")[1]] == [("personal", 2)]
    assert [(b["adapter"], b["version"]) for b in served("pia/personal")[1]] == [("personal", 2)]
    pinned_text, pinned = served("pia/personal@1", user=None)
    assert [(b["adapter"], b["version"]) for b in pinned] == [("personal", 1)]
    assert served("pia/personal@1")[0] == pinned_text  # a pinned version answers the same, user or not
    assert [(b["adapter"], b["version"]) for b in served("task:summaries")[1]] == [("summaries", 1)]
    assert [(b["adapter"], b["version"]) for b in served("task:summaries@1")[1]] == [("summaries", 1)]

    # the personalization dial, an extension field: 0 is the base model, 0.5 halves the adapter's weight
    def dialled(scale: float) -> openai.types.Completion:
        return client.completions.create(
            model="lorafleet",
            prompt="Hi",
            max_tokens=4,
            temperature=0,
            user="pia",
            extra_body={"adapter_scale": scale},
        )

    dial = dialled(0)
    assert (dial.model_extra or {})["lorafleet"][0]["served_by"] == [] and dial.choices[0].text == base_text
    half = dialled(0.5)
    assert [b["weight"] for b in (half.model_extra or {})["lorafleet"][0]["served_by"]] == [0.5]

    for unknown in ("gpt-4o", "pia/personal@7", "task:nothing", "nobody/personal", "pia/personal@0"):
        with pytest.raises(openai.NotFoundError) as raised:
            client.completions.create(model=unknown, prompt="Hi", max_tokens=2, user="pia")
        assert raised.value.body["code"] == "model_not_found", (unknown, raised.value.body)  # type: ignore[index]

    chat = client.chat.completions.create(
        model="lorafleet",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        ],
        max_tokens=3,
        temperature=0,
        user="pia",
        tools=[],
        response_format={"type": "text"},
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == len(
        "system: Be brief.\nuser: Hello\nassistant:"
    )
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    refused = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "tool_choice": "auto",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    }
    for field, value in refused.items():
        body = {"model": "lorafleet", "messages": [{"role": "user", "content": "Hi"}], field: value}
        answer = httpx.post(f"{api.url}/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 422 and answer.json()["error"]["field"].startswith(field), answer.text
