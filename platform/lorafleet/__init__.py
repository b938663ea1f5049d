"""lorafleet: per-user LoRA adapters on a shared frozen (4-bit) backbone.

Importing ``lorafleet`` is cheap: heavy parts (torch, transformers, ray) are imported by the submodules
that need them, never here. ``lorafleet.Client`` and ``lorafleet.AsyncClient`` (the SDK) load on first use.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from lorafleet._exports import lazy_export


def _hub_offline() -> None:
    """lorafleet fetches nothing at run time. transformers 5.x installs the hub's ``kernels`` package, and
    bitsandbytes, at import on a CPU with AVX512-BF16, asks it for a 4-bit kernel from the Hugging Face hub (code it
    would download and run). The hub's offline mode stops that, and any other hub call, unless the user set it
    either way."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    # imported before lorafleet (say, by transformers), the hub's constants have read the environment already
    constants: Any = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


_hub_offline()
# ``kernels`` then warns that it skips its publisher check offline, and bitsandbytes that it could not load that
# kernel, on every process; the portable CPU kernel it falls back to is the one lorafleet uses and tests.
logging.getLogger("kernels").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
# ``lorafleet.Client`` imports the SDK (httpx, pydantic) only when asked for.
__getattr__, __dir__, _sdk_names = lazy_export(__name__, {"lorafleet.sdk": ("AsyncClient", "Client")})
__all__ = [*_sdk_names, "__version__"]
