"""Serving over the real registry, databases and object stores: cold loads by sha256, a corrupted blob,
and a rollback while requests are in flight through the batching queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.polling import wait_for

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.errors import BlobIntegrityError
from lorafleet.registry import Registry
from lorafleet.serving import (
    AdapterCache,
    BatchingQueue,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
)
from lorafleet.serving.engine import database_resolver
from lorafleet.store.blob import BlobStore, LocalBlobStore, S3BlobStore
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant, SqlUser

PROMPT = "Tell me something."


@dataclass
class World:
    registry: Registry
    blobs: BlobStore
    tenant_id: int
    users: dict[str, int]
    engine: GenerationEngine

    def adapter(self, user: str, folders: list[Path], *, live: int | None = 1) -> tuple[int, list[str]]:
        """A personal adapter of ``user`` with one version per folder; returns its id and the versions' sha256."""
        adapter = self.registry.create_adapter(
            tenant_id=self.tenant_id, owner_user_id=self.users[user], name="personal", target_config={}
        )
        shas = []
        for folder in folders:
            version = self.registry.register_version(
                tenant_id=self.tenant_id,
                adapter_id=adapter.id,
                adapter_dir=folder,
                base_fingerprint="tiny-v1",
            )
            shas.append(version.sha256)
        if live is not None:
            self.promote(adapter.id, live)
        return adapter.id, shas

    def ask(self, user: str) -> GenerationRequest:
        return GenerationRequest(tenant_id=self.tenant_id, user=user, prompt=PROMPT, max_new_tokens=6)

    def promote(self, adapter_id: int, number: int) -> None:
        self.registry.promote(tenant_id=self.tenant_id, adapter_id=adapter_id, number=number, actor="test")


@pytest.fixture
def world(database: Database, blob_store: BlobStore, backbone: Backbone, bank: AdapterBank) -> World:
    with database.session() as s:
        tenant = SqlTenant(name="tenant")
        s.add(tenant)
        s.flush()
        rows = [SqlUser(tenant_id=tenant.id, external_id=name) for name in ("alice", "bob", "carol")]
        s.add_all(rows)
        s.flush()
        tenant_id, users = tenant.id, {r.external_id: r.id for r in rows}
    cache = AdapterCache.from_blob_store(bank, blob_store, capacity_slots=4)
    engine = GenerationEngine(backbone, bank, cache, resolve_bank=database_resolver(database))
    return World(Registry(database, blob_store), blob_store, tenant_id, users, engine)


def corrupt(blobs: BlobStore, sha256: str, endpoint: Callable[[], str]) -> None:
    """Flip one byte of a stored blob behind the store's back."""
    if isinstance(blobs, LocalBlobStore):
        path = blobs.path_for(sha256)
        data = bytearray(path.read_bytes())
        path.chmod(0o644)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    import boto3

    assert isinstance(blobs, S3BlobStore)
    client = boto3.client("s3", endpoint_url=endpoint(), region_name="us-east-1")
    body = bytearray(client.get_object(Bucket=blobs.bucket, Key=blobs.key_for(sha256))["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=blobs.bucket, Key=blobs.key_for(sha256), Body=bytes(body))


def test_a_cold_load_fills_a_slot_with_the_live_versions_weights(
    world: World, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    folder = adapter_folders(20)
    _, (sha,) = world.adapter("alice", [folder])
    alice, carol = world.engine.generate([world.ask("alice"), world.ask("carol")])
    assert [(s.version, s.sha256, s.weight) for s in alice.served_by] == [(1, sha, 1.0)]
    assert carol.served_by == ()
    slot = world.engine.cache.slot_of(sha)
    assert slot is not None
    expected = load_file(str(folder / "adapter_model.safetensors"))
    loaded = bank.slot_state_dict(slot)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    world.engine.generate([world.ask("alice")])
    stats = world.engine.cache.stats()
    assert (stats.misses, stats.hits, stats.loads) == (1, 1, 1)


def test_a_corrupted_blob_fails_only_the_requests_that_need_it(
    world: World, bank: AdapterBank, adapter_folders: Callable[[int], Path], request: pytest.FixtureRequest
) -> None:
    world.adapter("alice", [adapter_folders(21)])
    _, (bad,) = world.adapter("bob", [adapter_folders(22)])
    corrupt(world.blobs, bad, lambda: str(request.getfixturevalue("moto_endpoint")))
    outcomes = world.engine.generate_each(
        [world.ask("alice"), world.ask("bob"), world.ask("carol"), world.ask("bob")]
    )
    assert isinstance(outcomes[1], BlobIntegrityError) and outcomes[3] is outcomes[1]
    assert isinstance(outcomes[0], GenerationResult) and outcomes[0].served_by
    assert isinstance(outcomes[2], GenerationResult) and outcomes[2].served_by == ()
    names = {info.config.name for info in bank.occupied().values()}
    assert bad not in names and len(names) == 1  # only alice's version holds a slot
    stats = world.engine.cache.stats()
    assert stats.load_failures == 1 and stats.slots_used == 1
    assert world.engine.metrics.snapshot()["failures"] == {"blob_integrity_error": 2}


def test_rollback_while_requests_are_in_flight(world: World, adapter_folders: Callable[[int], Path]) -> None:
    adapter_id, (sha1, sha2) = world.adapter("alice", [adapter_folders(30), adapter_folders(31)])
    tokens = {1: world.engine.generate([world.ask("alice")])[0].token_ids}
    world.promote(adapter_id, 2)
    tokens[2] = world.engine.generate([world.ask("alice")])[0].token_ids
    world.registry.rollback(tenant_id=world.tenant_id, adapter_id=adapter_id, to_number=1, actor="test")
    assert tokens[1] != tokens[2]  # the two versions are told apart by their outputs

    submitted: list[tuple[float, Future[GenerationResult]]] = []
    stop = threading.Event()
    with BatchingQueue(world.engine, max_batch_size=4, max_wait_ms=2) as queue:

        def submit_continuously() -> None:
            while not stop.is_set():
                submitted.append((time.monotonic(), queue.submit(world.ask("alice"))))
                time.sleep(0.002)

        submitter = threading.Thread(target=submit_continuously)
        submitter.start()
        time.sleep(0.05)
        world.promote(adapter_id, 2)
        wait_for(
            "version 2 to be served",
            lambda: any(_version(f) == 2 for _, f in list(submitted)),
            timeout=30.0,
            every=0.005,
        )
        world.registry.rollback(tenant_id=world.tenant_id, adapter_id=adapter_id, to_number=1, actor="test")
        rolled_back = time.monotonic()
        wait_for(
            "10 answers after the rollback",
            lambda: sum(1 for t, f in list(submitted) if t > rolled_back and f.done()) >= 10,
            timeout=30.0,
            every=0.005,
        )
        stop.set()
        submitter.join()
    results = [(t, f.result(timeout=10)) for t, f in submitted]
    revisions: dict[int, set[str | None]] = {1: set(), 2: set()}
    for t, result in results:
        (served,) = result.served_by  # wholly one version
        assert result.token_ids == tokens[served.version]  # and really computed with that version's weights
        assert served.sha256 == (sha1 if served.version == 1 else sha2)
        revisions[served.version].add(result.bank_revision)
        if t > rolled_back:
            assert served.version == 1
    assert {v for _, r in results for v in [r.served_by[0].version]} == {1, 2}
    assert len(revisions[1]) == len(revisions[2]) == 1 and revisions[1] != revisions[2]


def _version(future: Future[GenerationResult]) -> int | None:
    return future.result().served_by[0].version if future.done() else None
