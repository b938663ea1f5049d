"""``ClosesOnExit``: the context-manager protocol of an object that is released by one ``close()`` call."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosesOnExit:
    """Mixin for a context manager whose ``with`` block yields the object itself and ends by calling
    ``close()``; the class defines ``close``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
