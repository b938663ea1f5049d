"""Helpers for the API and SDK tests: a uvicorn server in a thread, feedback records, real adapter folders
for the tiny backbone, and row counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from services.api.runtime import ApiOptions
from sqlalchemy import func, select
from tests.tiny import (
    TINY_TRAINING as TINY_TRAINING,  # re-exported: the tests here import it from this module
)

from lorafleet.platform import Platform
from lorafleet.sdk import Client
from lorafleet.store.sql.database import Database

#: serving in fp32 (the tiny backbone's nf4 decode is slower on CPU and not what these tests are about)
SERVING_OPTIONS = ApiOptions(
    serving_quantization="fp32", engine_slots=4, engine_max_rank=8, max_body_bytes=1024 * 1024
)

ADMIN_KEY = "admin-test-key-0123456789"
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class TenantHandle:
    """A tenant made through the API, its key and an SDK client with that key."""

    id: int
    name: str
    api_key: str
    client: Client


#: the library over the API's database and object store, for setting up and checking rows directly
Library = Platform


class ApiServer:
    """A real uvicorn server for ``app`` on 127.0.0.1 and a free port, run in a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 120.0) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, *, timeout: float = 120.0) -> None:
        """Graceful shutdown: the lifespan stops the runtime (trainer actors are killed) and closes the app."""
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the API server did not stop"


def sft(prompt: str, completion: str = "An answer.", **metadata: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": "sft", "prompt": prompt, "completion": completion}
    if metadata:
        record["metadata"] = metadata
    return record


def count_rows(db: Database, model: Any, *where: Any) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def write_adapter_folder(data_dir: Path, dest: Path, *, seed: int, rank: int = 4) -> Path:
    """A real PEFT folder for the tiny backbone: random A and B on q_proj and v_proj, saved through a bank."""
    # imported here: it loads torch, which the API tests that need no adapter folder do not
    from tests.lora_weights import write_random_peft_folder

    return write_random_peft_folder("builtin:tiny", data_dir, dest, seed=seed, rank=rank)


def live_personal_version(
    library: Library, *, tenant_id: int, user: str, folder: Path, name: str = "personal"
) -> int:
    """Register ``folder`` as the next version of the user's adapter ``name`` and make it live; its number."""
    found = library.tenants.get_or_create_user(tenant_id=tenant_id, external_id=user)
    adapter = library.registry.get_or_create_adapter(
        tenant_id=tenant_id, owner_user_id=found.id, name=name, target_config={}
    )
    version = library.registry.register_version(
        tenant_id=tenant_id, adapter_id=adapter.id, adapter_dir=folder, base_fingerprint="tiny"
    )
    library.registry.promote(tenant_id=tenant_id, adapter_id=adapter.id, number=version.number, actor="test")
    return version.number


def live_task_version(library: Library, *, tenant_id: int, task: str, folder: Path) -> int:
    """Register ``folder`` as the next version of the tenant's task adapter (created if absent), make it live."""
    adapter = library.registry.get_or_create_adapter(
        tenant_id=tenant_id, owner_user_id=None, name=task, target_config={}
    )
    version = library.registry.register_version(
        tenant_id=tenant_id, adapter_id=adapter.id, adapter_dir=folder, base_fingerprint="tiny"
    )
    library.registry.promote(tenant_id=tenant_id, adapter_id=adapter.id, number=version.number, actor="test")
    return version.number


@dataclass(frozen=True)
class LiveVersions:
    """Live versions made straight in one tenant's store, each from ``adapter_folder(seed)``: ``personal`` and
    ``task`` are ``live_personal_version`` and ``live_task_version`` for that tenant (each returns its number)."""

    library: Library
    tenant_id: int
    adapter_folder: Callable[[int], Path]

    def personal(self, user: str, seed: int, *, name: str = "personal") -> int:
        folder = self.adapter_folder(seed)
        return live_personal_version(
            self.library, tenant_id=self.tenant_id, user=user, folder=folder, name=name
        )

    def task(self, task: str, seed: int) -> int:
        return live_task_version(
            self.library, tenant_id=self.tenant_id, task=task, folder=self.adapter_folder(seed)
        )
