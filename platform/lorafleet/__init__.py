"""lorafleet: per-user LoRA adapters on a shared frozen (4-bit) backbone.

Importing ``lorafleet`` is cheap: heavy parts (torch, transformers, ray) are imported by the submodules
that need them, never here. ``lorafleet.Client`` and ``lorafleet.AsyncClient`` (the SDK) load on first use.
"""

from __future__ import annotations

import logging

from lorafleet._exports import lazy_export

# bitsandbytes warns at import, on every process, that the optional ``kernels`` package (which would fetch code
# from a hub) is absent; the portable CPU kernel it falls back to is the one lorafleet uses and tests.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
# ``lorafleet.Client`` imports the SDK (httpx, pydantic) only when asked for.
__getattr__, __dir__, _sdk_names = lazy_export(__name__, {"lorafleet.sdk": ("AsyncClient", "Client")})
__all__ = [*_sdk_names, "__version__"]
