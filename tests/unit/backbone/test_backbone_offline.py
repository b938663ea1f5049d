"""Nothing reaches past loopback when lorafleet's model stack loads.

transformers 5.x installs the hub's ``kernels`` package, and bitsandbytes, at import on a CPU with AVX512-BF16,
asks it for a 4-bit kernel from the Hugging Face hub (code it would download and run). lorafleet never fetches
anything at run time, so importing it turns the hub's offline mode on unless the user set it either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Records every host name resolved or connected to, then loads what a training or serving process loads.
_PROBE = r"""
import json, socket
seen = []
_getaddrinfo, _connect = socket.getaddrinfo, socket.create_connection
def getaddrinfo(host, *args, **kwargs):
    seen.append(str(host))
    return _getaddrinfo(host, *args, **kwargs)
def create_connection(address, *args, **kwargs):
    seen.append(str(address[0]))
    return _connect(address, *args, **kwargs)
socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection
if FIRST == "transformers":  # the hub's constants are read before lorafleet sets the environment
    import transformers  # noqa: F401
import lorafleet
import bitsandbytes, transformers  # noqa: F401
import lorafleet.backbone, lorafleet.training, lorafleet.serving.factory  # noqa: F401
import os
print(json.dumps({"seen": seen, "offline": os.environ.get("HF_HUB_OFFLINE")}))
"""

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.mark.parametrize("first", ["lorafleet", "transformers"])
def test_loading_the_model_stack_resolves_no_host_but_loopback_and_says_nothing_of_it(first: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    code = f"FIRST = {first!r}\n{_PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=180, env=env
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [h for h in result["seen"] if h not in LOOPBACK] == []
    assert result["offline"] == "1"
    # neither the kernels package nor bitsandbytes tells the user about the kernel it did not fetch
    assert "kernels-community" not in out.stderr, out.stderr


def test_a_users_own_hub_setting_is_kept() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    env["HF_HUB_OFFLINE"] = "0"
    code = "import os, lorafleet; print(os.environ['HF_HUB_OFFLINE'])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, env=env
    )
    assert out.stdout.strip() == "0"
