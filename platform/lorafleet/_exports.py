"""Lazy package exports: a package's ``__getattr__`` imports a name's submodule only when the name is asked for,
so importing the package stays cheap (no torch until something that needs it is used)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any


def lazy_export(package: str, exports: Mapping[str, str], name: str) -> Any:
    """``name`` from the submodule ``exports`` maps it to (``AttributeError`` when it is not exported)."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(import_module(exports[name]), name)
