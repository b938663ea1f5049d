"""The import-linter layers contract (``[tool.importlinter]``, run by ``make lint``) names every top-level
module and package of ``lorafleet``: a new one that no layer names would escape the check."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _layered() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    names: set[str] = set()
    for layer in contract["layers"]:
        for part in layer.replace("|", ":").split(":"):
            names.add(part.strip())
    return names


def test_every_lorafleet_module_is_in_a_layer() -> None:
    library = ROOT / "platform" / "lorafleet"
    top = {
        f"lorafleet.{p.stem if p.is_file() else p.name}"
        for p in library.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())
    }
    missing = sorted(top - _layered())
    assert not missing, f"not in any layer of [tool.importlinter]: {missing}"
    assert "services" in _layered()
