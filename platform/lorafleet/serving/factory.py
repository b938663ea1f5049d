"""``build_engine``: a ``GenerationEngine`` from the settings, over the metadata database and the registry.

It loads the configured backbone (``LORAFLEET_BACKBONE``, its quantization and device), wraps every linear
layer in an adapter bank of ``n_slots`` slots up to rank ``max_rank`` (a trained version of any target modules
and rank up to that fits), fills the slots from the registry's object store by content hash, resolves each
user's experts from the database and builds each user's gate, loading learned gates from the registry.

The slots hold the adapters in ``adapters.serving_dtype`` (bf16 on CUDA, fp32 on CPU). Under them the cache keeps
a host-memory tier of up to ``host_adapters`` versions within ``host_bytes`` (``serving.cache.HostTier``), so a
slot miss on any of the last thousand or so versions used is a memory copy, not an object-store read.

On CPU the 4-bit layers compute from dense copies made once (``adapters.dense.densify``, within
``Settings.serving_dense_mb``): bitsandbytes would otherwise dequantise every weight at every decoding step.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorafleet.adapters import inject_bank, serving_dtype
from lorafleet.adapters.dense import dense_budget, densify
from lorafleet.backbone import load_backbone
from lorafleet.backbone.chat import general_side_on
from lorafleet.config import Settings
from lorafleet.routing.embeddings import common_direction, embed_prompts
from lorafleet.routing.gates import Gate, build_gate
from lorafleet.routing.learned import load_learned_gate
from lorafleet.serving.cache import AdapterCache
from lorafleet.serving.engine import (
    GateFactory,
    GenerationEngine,
    OnNonFinite,
    database_model_resolver,
    database_resolver,
)

if TYPE_CHECKING:
    from lorafleet.registry import Registry
    from lorafleet.routing.experts import ExpertSet
    from lorafleet.routing.spec import GateSpec
    from lorafleet.store.sql.database import Database

logger = logging.getLogger(__name__)

DEFAULT_SLOTS = 16
DEFAULT_MAX_RANK = 16
GATE_CACHE_SIZE = 256
#: the host tier under the slots: this many adapter versions at most ...
DEFAULT_HOST_ADAPTERS = 1000
#: ... within this many bytes of host memory (a rank-16 all-linear SmolLM2-135M version is about 19 MiB in fp32)
DEFAULT_HOST_BYTES = 4 << 30


def build_engine(
    settings: Settings,
    db: Database,
    registry: Registry,
    *,
    n_slots: int = DEFAULT_SLOTS,
    max_rank: int = DEFAULT_MAX_RANK,
    quantization: str | None = None,
    capacity_bytes: int | None = None,
    host_adapters: int = DEFAULT_HOST_ADAPTERS,
    host_bytes: int | None = DEFAULT_HOST_BYTES,
    general_prompts: Sequence[str] = (),
    general_to_base: bool | None = False,
    on_nonfinite: OnNonFinite | None = None,
) -> GenerationEngine:
    """Load the backbone and build the engine (slow: seconds for the tiny backbone, minutes for large ones).

    ``quantization`` overrides ``settings.backbone_quantization`` (e.g. fp32 for fast CPU tests).
    ``host_adapters``/``host_bytes``: the cache's host tier (0 adapters: none).
    ``general_prompts`` (the service passes ``training.general_prompts.ANCHOR_PROMPTS``): the mean of their
    embeddings is the backbone's common direction, which centroid gates leave out of their scores; with
    ``general_to_base`` (``Settings.gate_general_prompts``; None: ``backbone.chat.general_side_on``) they are also
    the base model's side of every centroid gate, so requests that no adapter holds are served by the base alone
    (``routing.gates.CentroidGate``). None: plain cosine, among adapters only. ``on_nonfinite``: see
    ``GenerationEngine`` (the services pass ``workflows.qa_triggers.on_nonfinite_output``).
    """
    backbone = load_backbone(
        settings.backbone,
        quantization=quantization or settings.backbone_quantization,
        device=settings.device,
        data_dir=settings.data_dir,
    )
    bank = inject_bank(
        backbone,
        target_modules="all-linear",
        n_slots=n_slots,
        max_rank=max_rank,
        dtype=serving_dtype(backbone.device),
    )
    # every decoding step runs every layer: on CPU, dequantise the 4-bit ones once (adapters/dense.py)
    mib = settings.serving_dense_mb
    viewed = densify(
        backbone.model, budget_bytes=dense_budget(backbone.device, None if mib is None else mib << 20)
    )
    if viewed:
        logger.info("serving from dense copies of %d 4-bit layers (LORAFLEET_SERVING_DENSE_MB)", viewed)
    cache = AdapterCache.from_blob_store(
        bank,
        registry.blobs,
        capacity_bytes=capacity_bytes,
        host_entries=host_adapters,
        host_bytes=host_bytes,
    )
    reference = embed_prompts(backbone, bank, list(general_prompts)) if general_prompts else None
    return GenerationEngine(
        backbone,
        bank,
        cache,
        resolve_bank=database_resolver(db),
        resolve_model=database_model_resolver(db),
        gate_factory=registry_gate_factory(
            registry,
            fingerprint=bank.fingerprint,
            general=reference if general_side_on(general_to_base, backbone.tokenizer) else None,
            common=None if reference is None else common_direction(reference),
        ),
        on_nonfinite=on_nonfinite,
        prefix_cache_bytes=settings.serving_prefix_cache_mb << 20,
    )


def registry_gate_factory(
    registry: Registry,
    *,
    fingerprint: str | None = None,
    max_gates: int = GATE_CACHE_SIZE,
    general: Any = None,
    common: Any = None,
) -> GateFactory:
    """``build_gate`` per user bank, learned gates downloaded from the registry (sha256-verified) in the
    bank's tenant; gates are kept by ``(tenant, spec)`` in an LRU, since a spec names immutable things only.
    ``general``: the backbone's general-prompt embeddings (prompts nearer one of them than to any adapter get the
    base); ``common``: its common direction (``routing.embeddings.common_direction``)."""
    gates: OrderedDict[tuple[int, GateSpec], Gate] = OrderedDict()
    lock = threading.Lock()

    def factory(bank: ExpertSet) -> Gate:
        key = (bank.tenant_id, bank.gate)
        with lock:
            if key in gates:
                gates.move_to_end(key)
                return gates[key]
        gate = build_gate(
            bank.gate,
            general=general,
            common=common,
            load_learned=lambda version_id: load_learned_gate(
                registry, tenant_id=bank.tenant_id, version_id=version_id, expected_fingerprint=fingerprint
            ),
        )
        with lock:
            gates[key] = gate
            while len(gates) > max_gates:
                gates.popitem(last=False)
        return gate

    return factory


__all__ = [
    "DEFAULT_HOST_ADAPTERS",
    "DEFAULT_HOST_BYTES",
    "DEFAULT_MAX_RANK",
    "DEFAULT_SLOTS",
    "build_engine",
    "registry_gate_factory",
]
