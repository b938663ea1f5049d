"""The ``lorafleet`` command line: ``lorafleet serve``, ``lorafleet db upgrade``, ``lorafleet demo``, ...

Each subcommand is a small function taking the parsed arguments; library errors are printed as one line
with their code and exit with status 2, so scripts can tell a refused input from a crash.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from lorafleet.entrypoints.deletion_args import add_forget_records, add_receipt
from lorafleet.errors import LorafleetError
from lorafleet.runtime.process import configure_logging, process_parser

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, name: str) -> Handler:
    """The handler ``name`` of ``lorafleet.entrypoints.<module>`` (or of ``module`` itself when it is a full
    ``lorafleet.`` name), imported only when its command runs: the handlers' modules load the database, the
    object store, Ray or torch, and ``lorafleet --help`` should load none of them."""
    path = module if module.startswith("lorafleet.") else f"lorafleet.entrypoints.{module}"

    def handler(args: argparse.Namespace) -> int:
        found = importlib.import_module(path)
        result: int = getattr(found, name)(args)
        return result

    return handler


def _admin(name: str) -> Handler:
    return _lazy("admin", name)


def _add_listing_options(parser: argparse.ArgumentParser) -> None:
    """``--limit``, ``--offset`` and ``--json`` of a command that lists rows (a page of them) as a table."""
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _at_least_one(text: str) -> int:
    """An ``int`` argument that must be 1 or more (argparse prints the reason and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="the API, the scheduler and local trainer workers in one process")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="Ray trainer actors to run (default 1)")
    serve.add_argument("--scheduler-interval", type=float, default=30.0, help="seconds between ticks")
    serve.add_argument("--no-scheduler", action="store_true", help="do not run the scheduler loop")
    serve.add_argument("--preload-engine", action="store_true", help="load the serving engine at start")
    serve.add_argument(
        "--serving-threads",
        type=_at_least_one,
        default=None,
        metavar="N",
        help="torch threads for the serving engine (default: torch's, less one per local trainer actor)",
    )
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not upgrade the schema at start (a migration job owns it)",
    )
    serve.set_defaults(handler=_admin("serve"))

    tenants = sub.add_parser("tenants", help="tenants").add_subparsers(dest="tenants_command", required=True)
    create = tenants.add_parser("create", help="create a tenant and print its API key (once)")
    create.add_argument("name")
    create.set_defaults(handler=_admin("tenants_create"))
    tenants.add_parser("list", help="list tenants").set_defaults(handler=_admin("tenants_list"))
    keys = tenants.add_parser("keys", help="a tenant's API keys: id, prefix, created, last used, revoked")
    keys.add_argument("name")
    keys.set_defaults(handler=_admin("tenants_keys"))
    revoke = tenants.add_parser("revoke-key", help="revoke one of a tenant's API keys by its id")
    revoke.add_argument("name")
    revoke.add_argument("key_id", type=int)
    revoke.set_defaults(handler=_admin("tenants_revoke_key"))

    users = sub.add_parser("users", help="a tenant's users and their live adapter versions")
    users.add_argument("--tenant", required=True, help="tenant name")
    _add_listing_options(users)
    users.set_defaults(handler=_admin("users"))

    audit = sub.add_parser("audit", help="the append-only audit log (oldest first)")
    audit.add_argument("--tenant", default=None, help="only this tenant's events (default: every tenant's)")
    audit.add_argument("--action", default=None, help="only this action, e.g. promote.forced, key.revoked")
    _add_listing_options(audit)
    audit.set_defaults(handler=_admin("audit"))

    versions = sub.add_parser("versions", help="a user's adapter versions (status, live, metrics)")
    lineage = sub.add_parser("lineage", help="a version's ancestors and descendants")
    promote = sub.add_parser(
        "promote", help="make a version of a user's adapter live (recorded in the history)"
    )
    rollback = sub.add_parser("rollback", help="move a user's live adapter back (recorded in the history)")
    for p in (versions, lineage, promote, rollback):
        p.add_argument("--tenant", required=True, help="tenant name")
        p.add_argument("--user", required=True, help="the user's external id")
        p.add_argument("--adapter", default="personal", help="adapter name (default personal)")
    versions.set_defaults(handler=_admin("versions"))
    lineage.add_argument("--version", type=int, required=True, help="version number")
    lineage.set_defaults(handler=_admin("lineage"))
    promote.add_argument("--version", type=int, required=True, help="version number")
    _add_promote_options(promote)
    promote.set_defaults(handler=_admin("promote"))
    rollback.add_argument("--to", required=True, help="an earlier version number, or 'none' (no adapter)")
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(handler=_admin("rollback"))

    verify = sub.add_parser(
        "verify",
        help="re-hash every version's blob: ok, corrupt or missing (exit 1 when one is not ok)",
    )
    verify.add_argument(
        "--tenant", default=None, help="only this tenant's versions (default: every tenant's)"
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="mark each corrupt or missing version 'corrupt' (never served again) and roll a live one back to "
        "the newest healthy earlier version, or none (recorded in the history, reason blob-corrupt)",
    )
    verify.add_argument("--only-bad", action="store_true", help="list only the versions that are not ok")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=_admin("verify"))

    gc = sub.add_parser(
        "gc",
        help="delete the blobs nothing needs any more: unreferenced ones past the grace period, and those of "
        "revoked or erased versions whose deletion hold has ended",
    )
    gc.add_argument("--json", action="store_true", help="print the deleted digests as JSON")
    gc.set_defaults(handler=_admin("gc"))


def _add_export_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser(
        "export",
        help="write a version as a PEFT folder archive (.tar.gz), or a user's or task's feedback as JSON Lines",
    )
    export.add_argument("--tenant", required=True, help="tenant name")
    export.add_argument("--user", default=None, help="the user's external id")
    export.add_argument("--task", default=None, help="a shared task's name (instead of --user)")
    export.add_argument("--adapter", default="personal", help="the user's adapter (default personal)")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--version", type=int, help="the version number to write as <adapter>-v<n>.tar.gz")
    what.add_argument("--feedback", action="store_true", help="write every record as <id>-feedback.jsonl")
    export.add_argument("--out", required=True, help="folder to write into (created if needed)")
    export.set_defaults(handler=_lazy("export", "export_command"))


def _add_promote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", required=True)
    p.add_argument(
        "--force",
        action="store_true",
        help="under promote rule qa, make live a version QA has not passed (recorded as forced; QA still "
        "evaluates it and rolls it back if it fails)",
    )


def _add_forget_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    forget = sub.add_parser("forget", help="erase data, with a deletion receipt").add_subparsers(
        dest="forget_command", required=True
    )
    user = forget.add_parser("user", help="erase a user and everything of theirs (blobs after the gc grace)")
    user.add_argument("user_id", help="the user's external id")
    user.add_argument("--tenant", required=True, help="tenant name")
    user.add_argument("--purge", action="store_true", help="delete the blobs now, not after the gc grace")
    user.add_argument("--json", action="store_true", help="print the receipt as JSON")
    user.set_defaults(handler=_lazy("forget_user", "forget_user_command"))
    add_forget_records(forget, lambda name: _lazy("deletion", name))
    add_receipt(sub, lambda name: _lazy("deletion", name))


def _add_workers_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workers = sub.add_parser(
        "workers", help="trainer actors on the configured Ray, running queued jobs until SIGTERM/SIGINT"
    )
    workers.add_argument("--count", type=int, default=1, help="trainer actors (default 1)")
    workers.add_argument("--poll-seconds", type=float, default=5.0, help="idle wait between polls")
    workers.add_argument("--grace-seconds", type=float, default=20.0, help="at stop, time for running jobs")
    workers.add_argument("--start-timeout", type=float, default=None, help="fail if actors are not up")
    workers.add_argument("--until-idle", action="store_true", help="exit once no job is claimable")
    workers.add_argument(
        "--training", default=None, help="JSON config for jobs queued without one (older jobs)"
    )
    workers.set_defaults(handler=_lazy("workers", "workers_command"))


def _add_job_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = sub.add_parser("jobs", help="a tenant's jobs: watch progress, cancel").add_subparsers(
        dest="jobs_command", required=True
    )
    watch = jobs.add_parser("watch", help="a job's progress bar until it ends (exit 1: failed or cancelled)")
    watch.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")
    watch.add_argument("--timeout", type=float, default=0.0, help="give up after N seconds (0: never)")
    cancel = jobs.add_parser("cancel", help="cancel a queued job now, or a running one at its next step")
    cancel.add_argument("--actor", default="cli", help="recorded as who cancelled it (default cli)")
    for p in (watch, cancel):
        p.add_argument("job_id", type=int)
        p.add_argument("--tenant", required=True, help="tenant name")
    watch.set_defaults(handler=_lazy("jobs", "jobs_watch"))
    cancel.set_defaults(handler=_lazy("jobs", "jobs_cancel"))


def _add_training_config_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = sub.add_parser("training-config", help="a tenant's training config overrides").add_subparsers(
        dest="training_config_command", required=True
    )
    show = config.add_parser("show", help="the tenant's overrides and the effective config, as JSON")
    put = config.add_parser("set", help="replace the tenant's overrides (TrainingConfig fields as JSON)")
    put.add_argument("overrides", nargs="?", default=None, help="e.g. '{\"learning_rate\": 1e-3}'")
    put.add_argument("--reset", action="store_true", help="remove every override (back to the defaults)")
    for p in (show, put):
        p.add_argument("--tenant", required=True, help="tenant name")
    show.set_defaults(handler=_admin("training_config_show"))
    put.set_defaults(handler=_admin("training_config_set"))


def _add_task_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tasks = sub.add_parser("tasks", help="a tenant's shared task adapters").add_subparsers(
        dest="tasks_command", required=True
    )
    listing = tasks.add_parser("list", help="task adapters: live version, versions, enrolled users, records")
    feedback = tasks.add_parser("feedback", help="submit a task's feedback records from a JSON-lines file")
    feedback.add_argument("task")
    feedback.add_argument(
        "file", help="one record per line ({'kind': 'sft', 'prompt': ..., ...}); - for stdin"
    )
    imp = tasks.add_parser("import", help="import a PEFT adapter folder or archive as a candidate version")
    imp.add_argument("task")
    imp.add_argument("source", help="a PEFT folder, or a .tar, .tar.gz or .zip archive of one")
    imp.add_argument("--prompt", action="append", default=[], help="an example prompt (repeat)")
    imp.add_argument("--prompts-file", default=None, help="example prompts, one per line")
    imp.add_argument("--reason", default="")
    imp.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for the import job (0: no wait)"
    )
    promote = tasks.add_parser("promote", help="make a task version live (enrolled users follow)")
    promote.add_argument("task")
    promote.add_argument("--version", type=int, required=True, help="version number")
    _add_promote_options(promote)
    rollback = tasks.add_parser("rollback", help="move a task's live version back (enrolled users follow)")
    rollback.add_argument("task")
    rollback.add_argument("--to", required=True, help="an earlier version number, or 'none' (no adapter)")
    rollback.add_argument("--reason", required=True)
    for p in (listing, feedback, imp, promote, rollback):
        p.add_argument("--tenant", required=True, help="tenant name")
    listing.set_defaults(handler=_admin("tasks_list"))
    feedback.set_defaults(handler=_admin("tasks_feedback"))
    imp.set_defaults(handler=_admin("tasks_import"))
    promote.set_defaults(handler=_admin("tasks_promote"))
    rollback.set_defaults(handler=_admin("tasks_rollback"))


def build_parser() -> argparse.ArgumentParser:
    parser = process_parser("lorafleet", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema (Alembic migrations)").add_subparsers(
        dest="db_command", required=True
    )
    up = db.add_parser("upgrade", help="migrate to the newest (or a given) revision")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(handler=_lazy("db", "db_upgrade"))
    down = db.add_parser("downgrade", help="migrate down to a revision ('base' drops everything)")
    down.add_argument("revision")
    down.set_defaults(handler=_lazy("db", "db_downgrade"))
    db.add_parser("current", help="print the current revision").set_defaults(
        handler=_lazy("db", "db_current")
    )

    qa = sub.add_parser("qa", help="QA reports").add_subparsers(dest="qa_command", required=True)
    report = qa.add_parser("report", help="print a QA report as a table")
    report.add_argument("report_id", type=int)
    report.add_argument("--tenant", type=int, default=None, help="only this tenant's report")
    report.set_defaults(handler=_admin("qa_report"))

    _add_admin_commands(sub)
    _add_export_command(sub)
    _add_forget_commands(sub)
    _add_job_commands(sub)
    _add_task_commands(sub)
    _add_training_config_commands(sub)
    _add_workers_command(sub)

    demo = sub.add_parser("demo", help="run the end-to-end demo on the embedded defaults (a few minutes)")
    demo.add_argument("--users", type=int, default=4, help="synthetic users (default 4)")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for training and QA")
    demo.set_defaults(handler=_lazy("lorafleet.demo", "demo_command"))

    deploy = sub.add_parser("serve-deploy", help="deploy or update the Ray Serve inference app, then exit")
    deploy.add_argument("--block", action="store_true", help="keep running (needed on a local Ray)")
    deploy.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    deploy.add_argument("--slots", type=int, default=16, help="adapter bank slots per replica (default 16)")
    deploy.add_argument("--max-rank", type=int, default=16, help="largest adapter rank served (default 16)")
    deploy.add_argument("--http-port", type=int, default=8000, help="a local Ray's Serve proxy port")
    deploy.set_defaults(handler=_lazy("serve_deploy", "serve_deploy_command"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    handler: Handler = args.handler
    try:
        return handler(args)
    except LorafleetError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
