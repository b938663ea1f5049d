"""lorafleet: per-user LoRA adapters on a shared frozen (4-bit) backbone.

Importing ``lorafleet`` is cheap: heavy parts (torch, transformers, ray) are imported by the submodules
that need them, never here. ``lorafleet.Client`` and ``lorafleet.AsyncClient`` (the SDK) load on first use.
"""

from __future__ import annotations

import logging
from typing import Any

# bitsandbytes warns at import, on every process, that the optional ``kernels`` package (which would fetch code
# from a hub) is absent; the portable CPU kernel it falls back to is the one lorafleet uses and tests.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "__version__"]

_SDK_EXPORTS = frozenset({"Client", "AsyncClient"})


def __getattr__(name: str) -> Any:
    """Lazy exports: ``lorafleet.Client`` imports the SDK (httpx, pydantic) only when asked for."""
    if name in _SDK_EXPORTS:
        from lorafleet import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'lorafleet' has no attribute {name!r}")
