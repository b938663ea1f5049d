"""Loading backbones in fp32, bf16, nf4 and int8 (bitsandbytes on CPU), frozen, with a working generate."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from lorafleet.backbone import load_backbone
from lorafleet.errors import ConfigError, UnsafeFormatError

LAYER_TYPES = {
    "fp32": torch.nn.Linear,
    "bf16": torch.nn.Linear,
    "nf4": bnb.nn.Linear4bit,
    "int8": bnb.nn.Linear8bitLt,
}


@pytest.mark.parametrize("quantization", ["fp32", "bf16", "nf4", "int8"])
def test_every_quantization_loads_frozen_and_generates(tiny_dir: Path, quantization: str) -> None:
    backbone = load_backbone(tiny_dir, quantization=quantization, device="cpu")
    model = backbone.model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is LAYER_TYPES[quantization]
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert backbone.device == torch.device("cpu") and backbone.is_quantized == (
        quantization in ("nf4", "int8")
    )
    assert backbone.dtype == (torch.bfloat16 if quantization == "bf16" else torch.float32)
    assert backbone.fingerprint.digest  # same checkpoint, same fingerprint whatever the quantization
    batch = backbone.tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_quantization_shrinks_the_backbone_and_keeps_one_fingerprint(tiny_dir: Path) -> None:
    loaded = {q: load_backbone(tiny_dir, quantization=q, device="cpu") for q in ("fp32", "bf16", "nf4")}
    sizes = {q: b.memory_bytes() for q, b in loaded.items()}
    assert sizes["nf4"] < sizes["bf16"] < sizes["fp32"]
    assert len({b.fingerprint for b in loaded.values()}) == 1


def test_builtin_tiny_is_built_on_demand(data_dir: Path) -> None:
    backbone = load_backbone("builtin:tiny", quantization="fp32", device="cpu", data_dir=data_dir)
    assert backbone.source == "builtin:tiny" and backbone.path.parent == data_dir / "backbones"


def test_bad_sources_and_options_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantization"):
        load_backbone(tiny_dir, quantization="fp8", device="cpu")
    with pytest.raises(ConfigError):
        load_backbone(tmp_path / "missing", device="cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeFormatError):
        load_backbone(pickled, device="cpu")


@pytest.mark.parametrize("quantization", ["nf4", "int8", "bf16", "fp32"])
def test_loading_never_asks_the_hub_for_kernels(quantization: str) -> None:
    """transformers 5.x swaps layers for the hub's "kernels" on CUDA unless told not to: code downloaded at load
    time, which offline failed the load on an H200 ("could not verify publisher trust status")."""
    from lorafleet.backbone.loading import _load_kwargs

    kwargs = _load_kwargs(quantization, torch.device("cuda"), torch.bfloat16)
    assert kwargs["use_kernels"] is False and kwargs["device_map"] == {"": "cuda"}
