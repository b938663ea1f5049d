"""The bad-input matrix over every route of the published OpenAPI schema (finding 1 of issue 18).

For every operation, each parameter and each top-level body field gets the probes its declared type invites:
integers too large for the database (2^31 for version numbers, 2^63 for ids), a boolean or a numeric string
where an integer belongs, NUL and other control characters in strings. Each probe is sent on top of a request
that is otherwise valid and names real objects (a user with feedback and a live adapter, a task with a live
version, a queued job), so the probe reaches the code behind the check. Every answer must be a 4xx, never a 500;
the probes the API refuses at its edge must be 422 naming the field; and none of them may change anything.

A route missing from ``BODIES`` fails the test, so a new route cannot skip the matrix.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from api_helpers import ADMIN_KEY, ApiServer, Library, live_personal_version, live_task_version, sft

from lorafleet.sdk import Client
from lorafleet.sdk.calls import adapter_archive

INT32_TOO_BIG = 2**31
INT64_TOO_BIG = 2**63
NUL = "a\x00b"
CONTROL = "a\x01b"

#: (method, path) -> a valid JSON body (None: no body); every operation of the schema must be here
BODIES: dict[tuple[str, str], Any] = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
    ("GET", "/v1/tenants"): None,
    ("POST", "/v1/tenants"): {"name": "fault-tenant"},
    ("POST", "/v1/tenants/{tenant_name}/keys"): None,
    ("GET", "/v1/tenants/{tenant_name}/keys"): None,
    ("POST", "/v1/tenants/{tenant_name}/keys/{key_id}/revoke"): None,
    ("POST", "/v1/admin/verify"): {"repair": False},
    ("GET", "/v1/admin/audit"): None,
    ("GET", "/v1/users"): None,
    ("GET", "/v1/audit"): None,
    ("DELETE", "/v1/users/{user_id}"): None,
    ("GET", "/v1/users/{user_id}/feedback"): None,
    ("GET", "/v1/users/{user_id}/feedback/export"): None,
    # no such record: a valid request would change nothing either
    ("DELETE", "/v1/users/{user_id}/feedback"): {"ids": [2147483000]},
    ("DELETE", "/v1/tasks/{task}/feedback"): {"ids": [2147483000]},
    ("GET", "/v1/deletions/{receipt_id}"): None,
    ("GET", "/v1/deletions"): None,
    ("POST", "/v1/users/{user_id}/feedback"): {"records": [sft("probe")]},
    ("GET", "/v1/users/{user_id}/adapters"): None,
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions"): None,
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions/{n}"): None,
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions/{n}/lineage"): None,
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions/{n}/download"): None,
    ("POST", "/v1/users/{user_id}/adapters/{name}/import"): {
        "archive_base64": "",
        "example_prompts": ["Hi"],
        "reason": "probe",
    },
    ("GET", "/v1/users/{user_id}/adapters/{name}/history"): None,
    ("POST", "/v1/users/{user_id}/adapters/{name}/promote"): {"version": 1, "reason": "probe"},
    ("POST", "/v1/users/{user_id}/adapters/{name}/rollback"): {"to_version": 1, "reason": "probe"},
    ("POST", "/v1/users/{user_id}/train"): None,
    ("GET", "/v1/jobs/{job_id}"): None,
    ("GET", "/v1/jobs"): None,
    ("POST", "/v1/jobs/{job_id}/cancel"): None,
    ("GET", "/v1/users/{user_id}/enrolments"): None,
    ("POST", "/v1/users/{user_id}/enrolments"): {"task": "summarise"},
    ("DELETE", "/v1/users/{user_id}/enrolments/{task}"): None,
    ("GET", "/v1/tasks"): None,
    ("GET", "/v1/models"): None,
    ("POST", "/v1/tasks/{task}/feedback"): {"records": [sft("task probe")]},
    ("GET", "/v1/tasks/{task}/feedback"): None,
    ("GET", "/v1/tasks/{task}/feedback/export"): None,
    ("POST", "/v1/tasks/{task}/import"): {"archive_base64": "", "example_prompts": ["Hi"], "reason": "probe"},
    ("POST", "/v1/tasks/{task}/train"): None,
    ("GET", "/v1/tasks/{task}/enrolments"): None,
    ("GET", "/v1/tasks/{task}/versions"): None,
    ("GET", "/v1/tasks/{task}/versions/{n}"): None,
    ("GET", "/v1/tasks/{task}/versions/{n}/lineage"): None,
    ("GET", "/v1/tasks/{task}/versions/{n}/download"): None,
    ("GET", "/v1/tasks/{task}/history"): None,
    ("POST", "/v1/tasks/{task}/promote"): {"version": 1, "reason": "probe"},
    ("POST", "/v1/tasks/{task}/rollback"): {"to_version": 1, "reason": "probe"},
    ("GET", "/v1/training-config"): None,
    ("PUT", "/v1/training-config"): {"max_steps": 3},
    ("POST", "/v1/users/{user_id}/generate"): {"prompt": "Hi", "max_tokens": 1},
    ("POST", "/v1/completions"): {"prompt": "Hi", "max_tokens": 1, "user": "alice", "temperature": 0},
    ("POST", "/v1/chat/completions"): {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "user": "alice",
        "temperature": 0,
    },
}
#: the generation bodies' text is never stored: there NUL or control characters in a prompt, a message or a stop
#: string need only be no 500 (a tokenizer takes them); their ``user`` is a name and their integers are strict,
#: as anywhere
GENERATION = {
    ("POST", "/v1/users/{user_id}/generate"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
}
#: free text a person writes (a reason, a prompt, a completion): control characters such as a newline or a tab
#: belong there, NUL never does
FREE_TEXT = {"reason", "prompt", "completion", "content", "expected", "example_prompts", "stop", "suffix"}


@dataclass(frozen=True)
class World:
    """A tenant whose every path can name something real."""

    api_key: str
    tenant_name: str
    job_id: int
    archive_b64: str

    def values(self) -> dict[str, str]:
        return {
            "user_id": "alice",
            "name": "personal",
            "n": "1",
            "job_id": str(self.job_id),
            "task": "summarise",
            "tenant_name": self.tenant_name,
            "key_id": "2147483000",  # no such key (the matrix must not revoke the tenant's own)
            "receipt_id": "del_" + "0" * 32,  # no such receipt
        }


@pytest.fixture(scope="module")
def world(api: ApiServer, admin: Client, library: Library, adapter_folder: Callable[[int], Path]) -> World:
    created = admin.create_tenant(f"faults-{uuid.uuid4().hex[:10]}")
    with Client(api.url, created.api_key, max_retries=0) as client:
        client.submit_feedback("alice", [sft("a1"), sft("a2")])
        live_personal_version(library, tenant_id=created.id, user="alice", folder=adapter_folder(1))
        client.submit_task_feedback("summarise", [sft("t1")])
        live_task_version(library, tenant_id=created.id, task="summarise", folder=adapter_folder(2))
        client.enrol("alice", "summarise")
        job = client.train("alice").job
    archive = base64.b64encode(adapter_archive(adapter_folder(3))).decode("ascii")
    return World(created.api_key, created.name, job.id, archive)


@pytest.fixture(scope="module")
def spec(api: ApiServer) -> dict[str, Any]:
    return dict(httpx.get(f"{api.url}/openapi.json").json())


@pytest.fixture(scope="module")
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=120) as client:
        yield client


def _operations(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _types(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The JSON types a schema admits (through ``$ref``, ``anyOf``, ``oneOf``; arrays by their items)."""
    schema = _resolve(spec, schema)
    found: set[str] = set()
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        found |= _types(spec, option)
    kind = schema.get("type")
    if kind == "array" and isinstance(schema.get("items"), dict):
        found |= {f"array of {t}" for t in _types(spec, schema["items"])}
    elif isinstance(kind, str):
        found.add(kind)
    return found


@dataclass(frozen=True)
class Probe:
    where: str  # path, query or body
    field: str
    value: Any
    refused: bool  # the API must answer 422 naming ``field`` (else: any 4xx or success, never a 500)
    index: int | None = None  # the probe is item ``index`` of a list: the 422 names ``field[index]``

    @property
    def named(self) -> str:
        return self.field if self.index is None else f"{self.field}[{self.index}]"


def _int_probes(where: str, field: str, *, lax: bool) -> list[Probe]:
    version = field in ("n", "version", "to_version")  # an int4 column; ids are int8
    probes = [Probe(where, field, INT32_TOO_BIG, version), Probe(where, field, INT64_TOO_BIG, True)]
    if where == "body":
        probes += [Probe(where, field, True, not lax), Probe(where, field, "5", not lax)]
    return probes


def _string_probes(where: str, field: str) -> list[Probe]:
    probes = [Probe(where, field, NUL, True)]
    if field not in FREE_TEXT:
        probes.append(Probe(where, field, CONTROL, True))
    return probes


def probes_for(spec: dict[str, Any], method: str, path: str) -> list[Probe]:
    operation = spec["paths"][path][method.lower()]
    lax = (method, path) in GENERATION  # body text only (see GENERATION)
    probes: list[Probe] = []
    for param in operation.get("parameters", []):
        if param["in"] not in ("path", "query"):
            continue
        types = _types(spec, param.get("schema", {}))
        if "integer" in types:
            probes += _int_probes(param["in"], param["name"], lax=False)
        elif "string" in types and "enum" not in _resolve(spec, param.get("schema", {})):
            probes += _string_probes(param["in"], param["name"])
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body is not None:
        schema = _resolve(spec, body)
        options = [_resolve(spec, o) for o in schema.get("anyOf", [schema])]
        properties = next((o["properties"] for o in options if "properties" in o), {})
        for field, declared in properties.items():
            types = _types(spec, declared)
            if "integer" in types:
                probes += _int_probes("body", field, lax=False)
            elif "string" in types or "array of string" in types:
                if field in ("model", "archive_base64"):
                    continue  # a name looked up (404) / base64 refused on its own
                value_probes = _string_probes("body", field)
                if lax and field != "user":
                    value_probes = [Probe(p.where, p.field, p.value, False) for p in value_probes]
                if "array of string" in types and "string" not in types:
                    value_probes = [Probe(p.where, p.field, [p.value], p.refused, 0) for p in value_probes]
                probes += value_probes
    return probes


def _request(http: httpx.Client, world: World, method: str, path: str, probe: Probe | None) -> httpx.Response:
    values = world.values()
    query: dict[str, Any] = {}
    body = BODIES[(method, path)]
    if path.endswith("/import"):  # a task's or a user's: a real archive, so the probe reaches the checks
        body = {**body, "archive_base64": world.archive_b64}
    if probe is not None and probe.where == "path":
        values[probe.field] = str(probe.value)
    elif probe is not None and probe.where == "query":
        query[probe.field] = str(probe.value)
    elif probe is not None:
        body = {**(body or {}), probe.field: probe.value}
    url = path.format(**{k: quote(v, safe="") for k, v in values.items()})
    key = ADMIN_KEY if path.startswith(("/v1/tenants", "/v1/admin")) else world.api_key
    headers = {"Authorization": f"Bearer {key}"}
    return http.request(method, url, params=query, json=body, headers=headers)


def _state(http: httpx.Client, world: World) -> list[Any]:
    """What the probes must not change: the tenant's feedback, versions, live aliases, jobs and enrolments."""
    headers = {"Authorization": f"Bearer {world.api_key}"}
    reads = [
        "/v1/users/alice/feedback",
        "/v1/users/alice/adapters",
        "/v1/users/alice/adapters/personal/history",
        "/v1/users/alice/enrolments",
        "/v1/tasks",
        "/v1/tasks/summarise/feedback",
        "/v1/tasks/summarise/history",
        "/v1/jobs",
    ]
    return [http.get(url, headers=headers).json() for url in reads]


def test_every_route_is_in_the_matrix(spec: dict[str, Any]) -> None:
    assert sorted(_operations(spec)) == sorted(BODIES)


def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(
    spec: dict[str, Any], http: httpx.Client, world: World
) -> None:
    before = _state(http, world)
    failures: list[str] = []
    sent = 0
    for method, path in _operations(spec):
        for probe in probes_for(spec, method, path):
            answer = _request(http, world, method, path, probe)
            sent += 1
            what = f"{method} {path} {probe.where} {probe.field}={probe.value!r}"
            if answer.status_code >= 500:
                failures.append(f"{what}: {answer.status_code} {answer.text[:200]}")
            elif probe.refused:
                error = answer.json().get("error", {}) if answer.status_code == 422 else {}
                if answer.status_code != 422 or error.get("field") != probe.named:
                    failures.append(f"{what}: {answer.status_code} {answer.text[:200]}, not 422 naming it")
    assert sent > 100  # the matrix really ran
    assert not failures, f"{len(failures)} of {sent} probes:\n" + "\n".join(failures)
    assert _state(http, world) == before


def test_generation_integers_are_strict(http: httpx.Client, world: World) -> None:
    headers = {"Authorization": f"Bearer {world.api_key}"}
    for value in ("5", True):
        answer = http.post(
            "/v1/users/alice/generate", json={"prompt": "Hi", "max_tokens": value}, headers=headers
        )
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "max_tokens", answer.text
