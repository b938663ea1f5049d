"""Checks on the text the service stores and looks up, shared by the API's edge and the SDK's bodies.

A *name* (a user id, an adapter, task or tenant name) is printable: no NUL, no other control character, no
line or paragraph separator (what ``str.isprintable`` says; the store's own checks of user ids and tenant names
use the same rule). *Free text* a person writes (a reason, a prompt, a completion) may hold newlines and tabs,
never NUL: PostgreSQL's text columns cannot store it, and its JSON operators cannot read it back. Each check
returns the value or raises ``ValueError`` with the reason (pydantic reports it against the field).
"""

from __future__ import annotations

#: the largest value of a PostgreSQL ``integer`` column (version numbers) and of a ``bigint`` one (ids)
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
#: the largest adapter archive an import accepts (the SDK and the CLI refuse a larger file before reading it all)
MAX_IMPORT_ARCHIVE_BYTES = 512 * 1024 * 1024


def printable_name(value: str) -> str:
    """``value`` if it holds only printable characters."""
    if not value.isprintable():
        raise ValueError("must not contain control or other non-printable characters")
    return value


def free_text(value: str) -> str:
    """``value`` if it holds no NUL character."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


__all__ = ["MAX_IMPORT_ARCHIVE_BYTES", "MAX_INT32", "MAX_INT64", "free_text", "printable_name"]
