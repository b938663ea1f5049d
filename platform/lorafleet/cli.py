"""The ``lorafleet`` command line: ``lorafleet serve``, ``lorafleet db upgrade``, ``lorafleet demo``, ...

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


def _qa_report(args: argparse.Namespace) -> int:
    from lorafleet.config import load_settings
    from lorafleet.qa.reports import format_report, load_report
    from lorafleet.registry import Registry
    from lorafleet.store.blob import open_blob_store_from_settings
    from lorafleet.store.sql.database import Database

    settings = load_settings()
    db = Database(settings.resolved_database_url)
    try:
        registry = Registry(db, open_blob_store_from_settings(settings))
        report, document = load_report(db, registry, report_id=args.report_id, tenant_id=args.tenant)
        print(format_report(report, document), end="")
    finally:
        db.dispose()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lorafleet.demo import run_demo

    return run_demo(users=args.users, timeout=args.timeout)


def _lazy(name: str) -> Handler:
    """A handler from ``lorafleet.cli_commands``, imported only when its command runs."""

    def handler(args: argparse.Namespace) -> int:
        from lorafleet import cli_commands

        result: int = getattr(cli_commands, name)(args)
        return result

    return handler


def _add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="the API, the scheduler and local trainer workers in one process")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="Ray trainer actors to run (default 1)")
    serve.add_argument("--scheduler-interval", type=float, default=30.0, help="seconds between ticks")
    serve.add_argument("--no-scheduler", action="store_true", help="do not run the scheduler loop")
    serve.add_argument("--preload-engine", action="store_true", help="load the serving engine at start")
    serve.set_defaults(handler=_lazy("serve"))

    tenants = sub.add_parser("tenants", help="tenants").add_subparsers(dest="tenants_command", required=True)
    create = tenants.add_parser("create", help="create a tenant and print its API key (once)")
    create.add_argument("name")
    create.set_defaults(handler=_lazy("tenants_create"))
    tenants.add_parser("list", help="list tenants").set_defaults(handler=_lazy("tenants_list"))

    users = sub.add_parser("users", help="a tenant's users and their live adapter versions")
    users.add_argument("--tenant", required=True, help="tenant name")
    users.add_argument("--limit", type=int, default=100)
    users.add_argument("--offset", type=int, default=0)
    users.set_defaults(handler=_lazy("users"))

    versions = sub.add_parser("versions", help="a user's adapter versions (status, live, metrics)")
    lineage = sub.add_parser("lineage", help="a version's ancestors and descendants")
    rollback = sub.add_parser("rollback", help="move a user's live adapter back (recorded in the history)")
    for p in (versions, lineage, rollback):
        p.add_argument("--tenant", required=True, help="tenant name")
        p.add_argument("--user", required=True, help="the user's external id")
        p.add_argument("--adapter", default="personal", help="adapter name (default personal)")
    versions.set_defaults(handler=_lazy("versions"))
    lineage.add_argument("--version", type=int, required=True, help="version number")
    lineage.set_defaults(handler=_lazy("lineage"))
    rollback.add_argument("--to", required=True, help="an earlier version number, or 'none' (no adapter)")
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(handler=_lazy("rollback"))


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

    qa = sub.add_parser("qa", help="QA reports").add_subparsers(dest="qa_command", required=True)
    report = qa.add_parser("report", help="print a QA report as a table")
    report.add_argument("report_id", type=int)
    report.add_argument("--tenant", type=int, default=None, help="only this tenant's report")
    report.set_defaults(handler=_qa_report)

    _add_admin_commands(sub)

    demo = sub.add_parser("demo", help="run the end-to-end demo on the embedded defaults (a few minutes)")
    demo.add_argument("--users", type=int, default=4, help="synthetic users (default 4)")
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for training and QA")
    demo.set_defaults(handler=_demo)
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
