"""Loading a backbone: any Hugging Face causal LM from a local folder, in fp32, bf16, or 4-bit/8-bit via bitsandbytes.

The backbone is frozen (``requires_grad=False``) and in eval mode; adapters are what trains. Quantised (nf4) is
the default, as in QLoRA. Both nf4 and int8 work on CPU with bitsandbytes >= 0.45; the device is chosen at run
time (``auto`` picks CUDA when present).
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorafleet.backbone.fingerprint import BackboneFingerprint, fingerprint_directory
from lorafleet.backbone.quiet import quiet_libraries
from lorafleet.backbone.smollm2 import SMOLLM2_BACKBONE, build_smollm2_backbone
from lorafleet.backbone.tiny import build_tiny_backbone
from lorafleet.config import TINY_BACKBONE, resolve_device
from lorafleet.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Quantization = Literal["nf4", "int8", "bf16", "fp32"]
QUANTIZATIONS: tuple[str, ...] = ("nf4", "int8", "bf16", "fp32")


@dataclass
class Backbone:
    """A loaded, frozen backbone with its tokenizer and fingerprint."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: BackboneFingerprint
    device: torch.device
    #: dtype the base layers compute in (bnb's compute dtype for nf4/int8); adapters default to fp32.
    dtype: torch.dtype
    quantization: str
    path: Path
    #: what the caller asked for: ``builtin:tiny`` or the folder path
    source: str

    @property
    def is_quantized(self) -> bool:
        return self.quantization in ("nf4", "int8")

    def memory_bytes(self) -> int:
        """Bytes held by the backbone's parameters and buffers."""
        return int(self.model.get_memory_footprint())


def resolve_backbone_path(source: str | Path, *, data_dir: str | Path | None = None) -> Path:
    """Turn a built-in name or a folder path into a checkpoint folder (building a built-in one if needed)."""
    if str(source) == TINY_BACKBONE:
        return build_tiny_backbone(data_dir)
    if str(source) == SMOLLM2_BACKBONE:
        return build_smollm2_backbone(data_dir)
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"backbone {str(source)!r} is neither a built-in backbone ({SMOLLM2_BACKBONE!r}, {TINY_BACKBONE!r}) "
            "nor a local Hugging Face folder"
        )
    return path


def load_backbone(
    source: str | Path = TINY_BACKBONE,
    *,
    quantization: str = "nf4",
    device: str = "auto",
    compute_dtype: torch.dtype | None = None,
    data_dir: str | Path | None = None,
) -> Backbone:
    """Load a frozen causal LM and its tokenizer from a local folder (or ``builtin:tiny``).

    ``compute_dtype`` is the dtype nf4/int8 layers compute in: bf16 on CUDA and fp32 on CPU by default (CPU bf16
    matmuls are slow on most machines).
    """
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    path = resolve_backbone_path(source, data_dir=data_dir)
    fingerprint = fingerprint_directory(path)  # also refuses pickle-only checkpoints before loading anything
    torch_device = torch.device(resolve_device(device))
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    kwargs = _load_kwargs(quantization, torch_device, compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot load backbone from {path}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if quantization == "nf4" and torch_device.type == "cpu":
        _disable_cpu_4bit_repacking(model)
    if quantization in ("nf4", "int8"):
        _release_checkpoint(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = (
        torch.bfloat16
        if quantization == "bf16"
        else torch.float32
        if quantization == "fp32"
        else compute_dtype
    )
    return Backbone(model, tokenizer, fingerprint, torch_device, dtype, quantization, path, str(source))


def _release_checkpoint(model: torch.nn.Module) -> None:
    """Drop the memory-mapped fp32 checkpoint once a quantised model is built from it.

    Parameters that are not quantised (embeddings, norms, a tied output head) come out of the loader as views
    into the safetensors file's memory map, which keeps the whole fp32 checkpoint mapped and resident: with
    SmolLM2 an nf4 process held 1,040 MiB after loading, 507 MiB of it file-backed. Copying those parameters
    into memory of their own lets the map go; freed loader buffers are handed back to the OS (glibc) too.
    Measured: 1,040 MiB -> about 590 MiB resident, 102 MiB of it file-backed (the libraries).
    """
    import torch

    quantized = {"Params4bit", "Int8Params"}
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if type(param).__name__ not in quantized and param.device.type == "cpu":
                    param.data = param.data.clone()  # the same Parameter object: tied weights stay tied
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.device.type == "cpu":
                    module._buffers[name] = buffer.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by this process instead
        pass


def _disable_cpu_4bit_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights in place on the first CPU inference forward.

    bitsandbytes 0.50 repacks a ``Linear4bit`` for its AVX512-bf16 CPU kernel when it first runs in eval mode
    without gradients; after that, a training forward backpropagates through an op with no autograd kernel
    (silently wrong adapter gradients), and layers whose d_in is not a multiple of 64 fail. One backbone serves
    QA, serving and training here, so the slower but always-correct dequantising path is used on CPU.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a bitsandbytes attribute)


def _load_kwargs(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> dict[str, Any]:
    import torch
    from transformers import BitsAndBytesConfig

    # use_kernels=False: transformers 5.x otherwise, on CUDA, swaps layers for the hub's "kernels" (code it would
    # download at load time; offline it fails the load: seen on an H200)
    common = {"device_map": {"": str(device)}, "use_kernels": False}
    if quantization == "fp32":
        return {"dtype": torch.float32, **common}
    if quantization == "bf16":
        return {"dtype": torch.bfloat16, **common}
    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # non-quantised parts (embeddings, norms, lm_head) stay in the compute dtype
    return {"quantization_config": config, "dtype": compute_dtype, **common}
