"""The ``lorafleet`` command line: ``lorafleet db upgrade``, ``lorafleet demo``, ...

Each subcommand is a small function taking the parsed arguments; library errors are printed as one line
with their code and exit with status 2, so scripts can tell a refused input from a crash.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from lorafleet.errors import LorafleetError

Handler = Callable[[argparse.Namespace], int]


def _db_upgrade(args: argparse.Namespace) -> int:
    from lorafleet.config import load_settings
    from lorafleet.store.sql import migrate

    url = load_settings().resolved_database_url
    migrate.upgrade(url, args.revision)
    print(f"database at revision {migrate.current_revision(url)}")
    return 0


def _db_downgrade(args: argparse.Namespace) -> int:
    from lorafleet.config import load_settings
    from lorafleet.store.sql import migrate

    url = load_settings().resolved_database_url
    migrate.downgrade(url, args.revision)
    print(f"database at revision {migrate.current_revision(url)}")
    return 0


def _db_current(_args: argparse.Namespace) -> int:
    from lorafleet.config import load_settings
    from lorafleet.store.sql import migrate

    print(migrate.current_revision(load_settings().resolved_database_url) or "(empty database)")
    return 0


def _demo(_args: argparse.Namespace) -> int:
    from lorafleet.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema (Alembic migrations)").add_subparsers(
        dest="db_command", required=True
    )
    up = db.add_parser("upgrade", help="migrate to the newest (or a given) revision")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(handler=_db_upgrade)
    down = db.add_parser("downgrade", help="migrate down to a revision ('base' drops everything)")
    down.add_argument("revision")
    down.set_defaults(handler=_db_downgrade)
    db.add_parser("current", help="print the current revision").set_defaults(handler=_db_current)

    sub.add_parser("demo", help="run the demo on the embedded defaults").set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    handler: Handler = args.handler
    try:
        return handler(args)
    except LorafleetError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
