"""The built-in tiny backbone: a small Llama-architecture causal LM and a byte-level tokenizer, for offline use.

It is built deterministically by the project (no download) and saved as a normal Hugging Face folder, so every
code path (config, tokenizer, generate, quantisation) is the real one. Building is idempotent: the folder is
written once, atomically, and its bytes are identical across runs, so its fingerprint is stable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorafleet.config import load_settings

#: Bump when the architecture, the init or the tokenizer changes: a new version is a new folder (and fingerprint).
TINY_VERSION = "v1"
TINY_SEED = 20240601
MARKER_FILE = "lorafleet_tiny.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
#: Small enough for fast CPU tests, with GQA (k/v heads < q heads) so k_proj/v_proj are not square.
TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
_INIT_STD = 0.05


def default_tiny_dir(data_dir: str | Path | None = None) -> Path:
    """Where the tiny backbone lives: ``<data_dir>/backbones/tiny-<version>`` (data_dir from the settings)."""
    if data_dir is None:
        data_dir = load_settings().data_dir
    return Path(data_dir) / "backbones" / f"tiny-{TINY_VERSION}"


def is_tiny_dir(folder: str | Path) -> bool:
    """Whether ``folder`` holds a built-in tiny backbone (random-init; only for fast tests)."""
    return (Path(folder) / MARKER_FILE).is_file()


def build_tiny_backbone(data_dir: str | Path | None = None, **dims: Any) -> Path:
    """Return the folder of the tiny backbone, building it first if absent (idempotent, atomic).

    ``dims`` override ``TINY_DIMS`` (e.g. ``hidden_size=512`` for benchmarks); overridden builds go to their own
    folder named after the overrides, so the default folder and its fingerprint never change.
    """
    target = default_tiny_dir(data_dir)
    if dims:
        suffix = "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
        target = target.with_name(f"{target.name}-{suffix}")
    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_tiny(tmp, {**TINY_DIMS, **dims})
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER_FILE).is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer (3 special tokens + 256 bytes, no merges): round-trips any text, needs no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def _tiny_config(vocab_size: int, dims: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        architectures=["LlamaForCausalLM"],
        **dims,
    )


def _write_tiny(folder: Path, dims: dict[str, Any]) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = _tiny_config(len(tokenizer), dims)
    model = LlamaForCausalLM(config)
    _deterministic_init(model)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = {"version": TINY_VERSION, "seed": TINY_SEED, "dims": dims}
    (folder / MARKER_FILE).write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")


def _deterministic_init(model: Any) -> None:
    """Fill every tensor from one seeded CPU generator in name order, independent of transformers' init code."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * _INIT_STD)
