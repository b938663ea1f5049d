"""Backbones: loading a frozen causal LM (fp32, bf16, nf4, int8), its fingerprint, the built-in ones (SmolLM2, tiny).

Importing this package is cheap; torch and transformers are imported by the functions that need them.

Its room (docs/architecture.md): the lowest ML package, on core only: the frozen model every other ML package
runs on. It knows nothing of adapters, versions or users.
"""

from lorafleet.backbone.fingerprint import BackboneFingerprint, fingerprint_directory, fingerprint_model
from lorafleet.backbone.loading import (
    QUANTIZATIONS,
    Backbone,
    Quantization,
    load_backbone,
    resolve_backbone_path,
)
from lorafleet.backbone.smollm2 import build_smollm2_backbone, default_smollm2_dir, find_smollm2_gguf
from lorafleet.backbone.tiny import (
    TINY_VERSION,
    build_tiny_backbone,
    build_tiny_tokenizer,
    default_tiny_dir,
    is_tiny_dir,
)

__all__ = [
    "QUANTIZATIONS",
    "TINY_VERSION",
    "Backbone",
    "BackboneFingerprint",
    "Quantization",
    "build_smollm2_backbone",
    "build_tiny_backbone",
    "build_tiny_tokenizer",
    "default_smollm2_dir",
    "default_tiny_dir",
    "is_tiny_dir",
    "find_smollm2_gguf",
    "fingerprint_directory",
    "fingerprint_model",
    "load_backbone",
    "resolve_backbone_path",
]
