"""What the repositories share: their dialect base, domain objects from ORM rows, and long ``IN (...)`` lists
cut into chunks.

ORM rows never leave ``lorafleet.store``: every repository method returns frozen domain dataclasses
(``lorafleet.domain``), built by ``from_row``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from lorafleet.domain import DatasetSnapshot
from lorafleet.errors import ValidationError
from lorafleet.store.sql.models import SqlDatasetSnapshot

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")
_T = TypeVar("_T")

#: the largest page a listing returns
MAX_PAGE_SIZE = 1000

#: how many values one ``IN (...)`` list holds (SQLite caps a statement's parameters)
IN_CHUNK = 500


class DialectRepository:
    """The base of the stateless repositories: all they keep is whether the database is PostgreSQL."""

    def __init__(self, *, dialect: str) -> None:
        self._postgres = dialect == "postgresql"


def check_page(*, limit: int, offset: int = 0) -> None:
    """Refuse pages that are empty, negative or larger than ``MAX_PAGE_SIZE``."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValidationError(f"limit: must be between 1 and {MAX_PAGE_SIZE}")
    if offset < 0:
        raise ValidationError("offset: must not be negative")


def from_row(cls: type[_D], row: object, **converted: Any) -> _D:
    """A ``cls`` whose fields are the row's attributes of the same names (a field typed with an enum gets the
    enum member of the stored value), except those given in ``converted`` (copies of JSON columns, ...). A field
    the row lacks is an error, not a silent default."""
    enums = _enum_fields(cls)
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.init and f.name not in converted}
    for name in enums.keys() & values.keys():
        values[name] = enums[name](values[name])
    return cls(**values, **converted)


@cache
def _enum_fields(cls: type) -> dict[str, type[Enum]]:
    """The fields of the dataclass ``cls`` whose type is an enum, with that enum."""
    hints = get_type_hints(cls)
    return {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, Enum)}


def to_snapshot(row: SqlDatasetSnapshot) -> DatasetSnapshot:
    """A dataset snapshot (the feedback store writes them, the registry's lineage reads them)."""
    return from_row(
        DatasetSnapshot,
        row,
        record_ids=None if row.record_ids is None else tuple(int(i) for i in row.record_ids),
        details=dict(row.details or {}),
    )


def chunks(items: Sequence[_T], size: int = IN_CHUNK) -> Iterator[Sequence[_T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = [
    "IN_CHUNK",
    "MAX_PAGE_SIZE",
    "DialectRepository",
    "check_page",
    "chunks",
    "from_row",
    "to_snapshot",
]
