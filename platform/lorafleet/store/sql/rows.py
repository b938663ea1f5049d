"""What the repositories share: domain objects from ORM rows, and long ``IN (...)`` lists cut into chunks.

ORM rows never leave ``lorafleet.store``: every repository method returns frozen domain dataclasses
(``lorafleet.domain``), built by ``from_row``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from lorafleet.domain import DatasetSnapshot
from lorafleet.store.sql.models import SqlDatasetSnapshot

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")
_T = TypeVar("_T")

#: how many values one ``IN (...)`` list holds (SQLite caps a statement's parameters)
IN_CHUNK = 500


def from_row(cls: type[_D], row: object, **converted: Any) -> _D:
    """A ``cls`` whose fields are the row's attributes of the same names, except those given in ``converted``
    (enums, copies of JSON columns, ...). A field the row lacks is an error, not a silent default."""
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.init and f.name not in converted}
    return cls(**values, **converted)


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


__all__ = ["IN_CHUNK", "chunks", "from_row", "to_snapshot"]
