"""The learned gate: a linear layer or a 2-layer MLP over pooled base embeddings, trained per user.

Labels are which member's training data a prompt came from; the adapters stay frozen (the gate only sees
base-model embeddings, so training it runs no adapter at all). Inputs are standardised with the training set's
mean and scale, kept in the gate as buffers.

A trained gate is versioned like an adapter: the user's adapter of kind ``gate`` (named ``gate``) gets a new
version whose blob is one safetensors file (``Registry.register_file_version``), promoted through the ``live``
alias like any version, and garbage-collected by the same rules. The version's ``training_config`` records the
members it was trained over (adapter and version ids); it has no lineage edges. The safetensors metadata holds
the class order and the backbone fingerprint, so a gate never runs on another backbone's embeddings.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import AdapterFormatError, BackboneMismatchError, NonFiniteError, ValidationError
from lorafleet.registry.peft_format import read_safetensors_header
from lorafleet.routing.embeddings import embed_prompts
from lorafleet.routing.experts import ExpertSet, gate_adapter_id

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank
    from lorafleet.backbone import Backbone
    from lorafleet.domain import AdapterVersion
    from lorafleet.registry import Registry
    from lorafleet.store.sql.database import Database

GATE_FORMAT = "lorafleet-gate/1"
GateArch = Literal["linear", "mlp"]


@dataclass(frozen=True)
class GateTrainingConfig:
    """Hyper-parameters of a learned gate (small: it trains in seconds on CPU)."""

    arch: GateArch = "linear"
    #: width of the MLP's hidden layer (unused by ``linear``)
    width: int = 64
    steps: int = 100
    learning_rate: float = 3e-2
    weight_decay: float = 1e-3
    batch_size: int = 256
    holdout_fraction: float = 0.2
    seed: int = 0
    embed_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.arch not in ("linear", "mlp"):
            raise ValidationError(f"gate arch must be 'linear' or 'mlp', got {self.arch!r}")
        if min(self.width, self.steps, self.batch_size, self.embed_batch_size) < 1:
            raise ValidationError("width, steps and batch sizes must be >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0 or not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValidationError("holdout_fraction in [0, 1), learning_rate > 0, weight_decay >= 0")


class GateNetwork(nn.Module):
    """Standardise, then ``linear`` (hidden -> classes) or ``mlp`` (hidden -> width -> GELU -> classes)."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, *, hidden_size: int, n_classes: int, arch: GateArch, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))  # [hidden]
        self.register_buffer("scale", torch.ones(hidden_size))  # [hidden]
        self.layers: nn.Module = (
            nn.Linear(hidden_size, n_classes)
            if arch == "linear"
            else nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, n_classes))
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers((embeddings - self.mean) / self.scale)  # [batch, n_classes]


@dataclass
class LearnedGateModel:
    """A gate network with its classes (member adapter ids, in logit order) and the backbone it was trained on."""

    network: GateNetwork
    class_adapter_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    hidden_size: int
    arch: GateArch
    width: int
    backbone_fingerprint: str | None = None

    @torch.no_grad()
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[batch, n_classes]`` for pooled embeddings ``[batch, hidden]``."""
        self.network.eval()
        return self.network(F.normalize(embeddings.detach().float().cpu(), dim=-1))


@dataclass(frozen=True)
class TrainedGate:
    """A freshly trained gate, its metrics and what it was trained over (for the version row)."""

    model: LearnedGateModel
    metrics: dict[str, float]
    config: GateTrainingConfig
    member_version_ids: tuple[int, ...]


def train_learned_gate(
    backbone: Backbone,
    bank: AdapterBank | None,
    *,
    user_bank: ExpertSet,
    prompts: Mapping[int, Sequence[str]],
    config: GateTrainingConfig | None = None,
) -> TrainedGate:
    """Train a gate over the bank's members from their training prompts (``prompts[adapter_id]``).

    Metrics: ``train_accuracy``, ``holdout_accuracy`` and, as a baseline on the same holdout,
    ``centroid_holdout_accuracy`` (keys from the training split), plus example counts.
    """
    config = config or GateTrainingConfig()
    members = user_bank.members
    _check_prompts(user_bank, prompts)
    train_x, train_y, hold_x, hold_y = _embedded_split(backbone, bank, user_bank, prompts, config)
    network = GateNetwork(
        hidden_size=int(train_x.shape[1]), n_classes=len(members), arch=config.arch, width=config.width
    )
    _fit(network, train_x, train_y, config)
    model = LearnedGateModel(
        network=network,
        class_adapter_ids=tuple(m.adapter_id for m in members),
        class_names=tuple(m.adapter_name for m in members),
        hidden_size=int(train_x.shape[1]),
        arch=config.arch,
        width=config.width,
        backbone_fingerprint=getattr(bank, "fingerprint", None),
    )
    metrics = _metrics(model, train_x, train_y, hold_x, hold_y, n_classes=len(members))
    return TrainedGate(model, metrics, config, tuple(m.version_id for m in members))


def _check_prompts(user_bank: ExpertSet, prompts: Mapping[int, Sequence[str]]) -> None:
    if len(user_bank.members) < 2:
        raise ValidationError("a learned gate needs a bank of at least two members")
    missing = [m.adapter_name for m in user_bank.members if not prompts.get(m.adapter_id)]
    if missing:
        raise ValidationError(f"no training prompts for members {missing}")


def _embedded_split(
    backbone: Backbone,
    bank: AdapterBank | None,
    user_bank: ExpertSet,
    prompts: Mapping[int, Sequence[str]],
    config: GateTrainingConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings and labels, split per member by a seeded shuffle (every member keeps >= 1 training prompt)."""
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for label, member in enumerate(user_bank.members):
        texts = list(prompts[member.adapter_id])
        order = list(range(len(texts)))
        random.Random(f"{config.seed}/{member.adapter_id}").shuffle(order)
        n_hold = min(int(len(texts) * config.holdout_fraction), len(texts) - 1)
        emb = embed_prompts(backbone, bank, [texts[i] for i in order], batch_size=config.embed_batch_size)
        for offset, chunk in ((2, emb[:n_hold]), (0, emb[n_hold:])):
            parts[offset].append(chunk)
            parts[offset + 1].append(torch.full((len(chunk),), label, dtype=torch.int64))
    train_x, train_y, hold_x, hold_y = (torch.cat(p) for p in parts)
    return train_x, train_y, hold_x, hold_y


def _fit(network: GateNetwork, x: torch.Tensor, y: torch.Tensor, config: GateTrainingConfig) -> None:
    """Standardise with the training set, then AdamW on cross-entropy in seeded minibatches."""
    with torch.no_grad():
        network.mean.copy_(x.mean(dim=0))
        network.scale.copy_(x.std(dim=0, unbiased=False).clamp(min=1e-4))
    with torch.random.fork_rng():  # a seeded init that leaves the global RNG alone
        torch.manual_seed(config.seed)
        for layer in network.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    network.train()
    for _ in range(config.steps):
        rows = torch.randperm(len(x), generator=generator)[: config.batch_size]
        loss = F.cross_entropy(network(x[rows]), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    network.eval()


def _metrics(
    model: LearnedGateModel,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    hold_x: torch.Tensor,
    hold_y: torch.Tensor,
    *,
    n_classes: int,
) -> dict[str, float]:
    metrics = {
        "train_examples": float(len(train_y)),
        "holdout_examples": float(len(hold_y)),
        "train_accuracy": _accuracy(model.logits(train_x), train_y),
    }
    if len(hold_y):
        keys = torch.stack([F.normalize(train_x[train_y == c].mean(dim=0), dim=0) for c in range(n_classes)])
        metrics["holdout_accuracy"] = _accuracy(model.logits(hold_x), hold_y)
        metrics["centroid_holdout_accuracy"] = _accuracy(F.normalize(hold_x, dim=-1) @ keys.T, hold_y)
    return metrics


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(dim=-1) == labels).float().mean())


# --- files ----------------------------------------------------------------------------------------------
def save_learned_gate(model: LearnedGateModel, path: Path) -> Path:
    """Write the gate as one safetensors file: tensors plus its classes and backbone in the metadata."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "lorafleet_gate": GATE_FORMAT,
        "arch": model.arch,
        "width": str(model.width),
        "hidden_size": str(model.hidden_size),
        "class_adapter_ids": json.dumps(list(model.class_adapter_ids)),
        "class_names": json.dumps(list(model.class_names)),
        "backbone_fingerprint": model.backbone_fingerprint or "",
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_learned_gate_file(path: Path, *, expected_fingerprint: str | None = None) -> LearnedGateModel:
    """Read a gate file (header checked first, never pickle); ``BackboneMismatchError`` for another backbone."""
    from safetensors.torch import load_file

    meta = read_safetensors_header(Path(path)).get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("lorafleet_gate") != GATE_FORMAT:
        raise AdapterFormatError(f"{Path(path).name} is not a lorafleet gate file")
    model = _model_from_metadata(meta)
    if (
        expected_fingerprint
        and model.backbone_fingerprint
        and model.backbone_fingerprint != expected_fingerprint
    ):
        raise BackboneMismatchError("the learned gate was trained on another backbone's embeddings")
    tensors = load_file(str(path), device="cpu")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise NonFiniteError("learned gate weights contain NaN or infinity")
    try:
        model.network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise AdapterFormatError(f"gate tensors do not match their metadata: {exc}") from exc
    model.network.eval()
    return model


def _model_from_metadata(meta: Mapping[str, Any]) -> LearnedGateModel:
    try:
        ids = tuple(int(i) for i in json.loads(meta["class_adapter_ids"]))
        names = tuple(str(n) for n in json.loads(meta["class_names"]))
        hidden, width, arch = int(meta["hidden_size"]), int(meta["width"]), meta["arch"]
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"gate metadata is malformed: {exc}") from exc
    if arch not in ("linear", "mlp") or len(ids) != len(names) or len(ids) < 1 or hidden < 1 or width < 1:
        raise AdapterFormatError("gate metadata is inconsistent")
    network = GateNetwork(hidden_size=hidden, n_classes=len(ids), arch=arch, width=width)
    fingerprint = str(meta.get("backbone_fingerprint") or "") or None
    return LearnedGateModel(network, ids, names, hidden, arch, width, fingerprint)


# --- the registry --------------------------------------------------------------------------------------
def register_learned_gate(
    registry: Registry,
    db: Database,
    *,
    user_bank: ExpertSet,
    trained: TrainedGate,
    base_fingerprint: str,
    actor: str,
    promote: bool = True,
    job_id: int | None = None,
) -> AdapterVersion:
    """Store the gate as the next version of the user's ``gate`` adapter (created on first use); promote it
    to ``live`` unless asked not to (then it serves once promoted)."""
    if user_bank.user_id is None:
        raise ValidationError("cannot register a gate for a user that does not exist")
    adapter_id = gate_adapter_id(db, tenant_id=user_bank.tenant_id, user_id=user_bank.user_id, create=True)
    assert adapter_id is not None
    training_config = {
        **asdict(trained.config),
        "class_adapter_ids": list(trained.model.class_adapter_ids),
        "member_version_ids": list(trained.member_version_ids),
        "bank_revision": user_bank.revision,
    }
    with tempfile.TemporaryDirectory(prefix="lorafleet-gate-") as tmp:
        path = save_learned_gate(trained.model, Path(tmp) / "gate.safetensors")
        version = registry.register_file_version(
            tenant_id=user_bank.tenant_id,
            adapter_id=adapter_id,
            weights_file=path,
            base_fingerprint=base_fingerprint,
            training_config=training_config,
            metrics=trained.metrics,
            job_id=job_id,
        )
    if promote:
        registry.promote(
            tenant_id=user_bank.tenant_id,
            adapter_id=adapter_id,
            number=version.number,
            actor=actor,
            reason="learned gate trained",
        )
    return version


def load_learned_gate(
    registry: Registry, *, tenant_id: int, version_id: int, expected_fingerprint: str | None = None
) -> LearnedGateModel:
    """Download a gate version (sha256-verified) and load it; what ``build_gate``'s loader does."""
    version = registry.get_version_by_id(tenant_id=tenant_id, version_id=version_id)
    with tempfile.TemporaryDirectory(prefix="lorafleet-gate-") as tmp:
        path = registry.fetch_file_version(version=version, dest=Path(tmp) / "gate.safetensors")
        return load_learned_gate_file(path, expected_fingerprint=expected_fingerprint)
