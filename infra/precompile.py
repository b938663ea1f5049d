"""Write the bytecode of what the services import, and only that, into the virtual environment (``make demo``).

pip compiles every module of every package it installs, one file at a time: for torch, Ray and transformers that
is about half of the runtime's install (27 s of 52 s on two cores), mostly for modules nothing here imports
(torch's test suites, Ray's dashboard, transformers' hundreds of model families). The Makefile installs them with
``--no-compile`` and runs this instead: it imports every module of the project and loads the tiny built-in
backbone, which compiles and caches exactly the modules the services, the trainer and the demo load (about 16 s on
one core; ``make demo`` converts the built-in backbone on the other core meanwhile). A module imported later that is
not cached compiles when first imported, as without pip's step. ``make setup`` (the tests) compiles every installed
module instead.

Run it with ``PYTHONDONTWRITEBYTECODE`` unset (the Makefile does), or nothing is written.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

PACKAGES = ("lorafleet", "services")
# what the Ray worker processes import before the project's code (the demo and the services start a local Ray),
# and what transformers imports lazily to read the built-in backbone's GGUF file
EXTRA = (
    "ray._private.workers.default_worker",
    "uvicorn",
    "tqdm",
    "accelerate",
    "gguf",
    "transformers.integrations.ggml",
    "transformers.modeling_gguf_pytorch_utils",
)


def main() -> int:
    warnings.simplefilter("ignore")
    failed: list[str] = []
    names = list(EXTRA)
    for root in PACKAGES:
        package = importlib.import_module(root)
        names += [
            info.name
            for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}.")
            if not info.name.endswith("__main__")
        ]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            # an optional extra (say the dev tools) not installed: its modules compile when first imported
            failed.append(f"{name} ({type(exc).__name__})")
    # transformers imports a model's code (modeling_utils, the Llama classes, the 4-bit integration, the
    # tokenizers: about 230 modules, 5.7 MB of source) only when a model loads: load the tiny built-in one
    from lorafleet.backbone import load_backbone

    load_backbone("builtin:tiny", quantization="nf4", device="cpu")
    print(
        f"precompiled the imports of {len(names) - len(failed)} modules and of a backbone's load",
        file=sys.stderr,
    )
    if failed:
        print("not imported: " + ", ".join(failed), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
