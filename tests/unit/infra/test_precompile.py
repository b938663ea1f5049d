"""``infra/precompile.py``, the set-up's bytecode step (``make setup`` installs the runtime with ``--no-compile``).

It must import every module of the project (a module that fails to import in a fresh set-up is named, and is a
bug here: the tests run with every extra installed) and write the bytecode of what they import. The run goes to
a private ``PYTHONPYCACHEPREFIX``, so it neither needs nor touches the virtual environment's caches.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_precompile_imports_every_project_module_and_writes_their_bytecode(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "precompile.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not imported" not in done.stderr, done.stderr[-2000:]
    assert "precompiled the imports of" in done.stderr

    tag = sys.implementation.cache_tag

    def cached(source: Path) -> Path:  # where PYTHONPYCACHEPREFIX puts a source file's bytecode
        source = source.resolve()
        return tmp_path / source.parent.relative_to(source.anchor) / f"{source.stem}.{tag}.pyc"

    # every module of the project (``__main__`` modules run when imported, so they are left out)
    project = [
        path
        for root in (ROOT / "platform" / "lorafleet", ROOT / "services")
        for path in root.rglob("*.py")
        if path.name != "__main__.py"
    ]
    assert len(project) > 100
    missing = [str(path.relative_to(ROOT)) for path in project if not cached(path).is_file()]
    assert not missing, missing
    # and the third-party stack they load, down to what Ray's worker processes import first (found, not imported)
    stack = (
        "torch",
        "transformers.modeling_utils",  # imported by transformers only when a model loads
        "transformers.models.llama.modeling_llama",
        "transformers.modeling_gguf_pytorch_utils",
        "ray._private.workers.default_worker",
    )
    for module in stack:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        assert cached(Path(spec.origin)).is_file(), module
