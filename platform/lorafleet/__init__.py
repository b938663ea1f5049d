"""lorafleet: per-user LoRA adapters on a shared frozen (4-bit) backbone.

Importing ``lorafleet`` is cheap: heavy parts (torch, transformers, ray) are imported by the submodules
that need them, never here.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
