"""The arguments of ``lorafleet forget records`` and ``lorafleet receipt`` (their handlers are in
``lorafleet.entrypoints.deletion``, imported only when they run: this module imports nothing heavy)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeAlias

#: ``handler(name)``: a lazily imported handler of ``lorafleet.entrypoints.deletion``
HandlerOf = Callable[[str], Any]


#: the subcommands of a parser (subscripted for mypy only: at run time the class is not generic)
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_forget_records(forget: Subcommands, handler: HandlerOf) -> None:
    """``forget records`` under the ``forget`` group (which ``lorafleet forget user`` shares); ``handler(name)``
    makes a lazy handler of ``lorafleet.entrypoints.deletion``'s function ``name``."""
    records = forget.add_parser(
        "records", help="forget a user's (or a task's) records: revoke the versions trained on them, rebuild"
    )
    records.add_argument("--tenant", required=True, help="tenant name")
    records.add_argument("--user", default=None, help="the user's id (or --task)")
    records.add_argument("--task", default=None, help="a shared task's name (or --user)")
    records.add_argument("--ids", default=None, help="record ids, comma-separated (or a filter)")
    records.add_argument(
        "--since", default=None, help="filter: stored at or after (ISO 8601 with a timezone)"
    )
    records.add_argument("--until", default=None, help="filter: stored before (ISO 8601 with a timezone)")
    records.add_argument(
        "--tag",
        action="append",
        default=[],
        help="filter: metadata key=value (repeatable; the value as JSON, else as text)",
    )
    records.add_argument("--purge", action="store_true", help="delete the revoked versions' blobs now")
    records.add_argument("--json", action="store_true", help="print the receipt as JSON")
    records.set_defaults(handler=handler("forget_records_command"))


def add_receipt(sub: Subcommands, handler: HandlerOf) -> None:
    """``lorafleet receipt ID --tenant T [--json]``."""
    receipt = sub.add_parser("receipt", help="a deletion's receipt and where its rebuild stands")
    receipt.add_argument("receipt_id")
    receipt.add_argument("--tenant", required=True, help="tenant name")
    receipt.add_argument("--json", action="store_true", help="print JSON instead of text")
    receipt.set_defaults(handler=handler("receipt_command"))
