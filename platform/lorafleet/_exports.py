"""Lazy package exports: a package's ``__getattr__`` imports a name's submodule only when the name is asked for,
so importing the package stays cheap (no torch until something that needs it is used)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any, NamedTuple


class LazyExports(NamedTuple):
    """A package's module-level ``__getattr__``, ``__dir__`` and ``__all__`` (PEP 562), in that order."""

    getattr: Callable[[str], Any]
    dir: Callable[[], list[str]]
    all: list[str]


def lazy_export(package: str, modules: Mapping[str, Iterable[str]]) -> LazyExports:
    """The lazy exports of ``package``: ``modules`` maps each submodule to the names it exports.

    A package uses it in one line, ``__getattr__, __dir__, __all__ = lazy_export(__name__, {...})``; a name
    is imported from its submodule on first use (``AttributeError`` for a name that is not exported).
    """
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(import_module(package))) | exports.keys())

    return LazyExports(__getattr__, __dir__, sorted(exports))
