"""Run the scheduler: one tick (``--once``) or a loop that stops cleanly on SIGTERM or SIGINT.

The database comes from the ``LORAFLEET_*`` settings; the policy from the flags below. After each tick the blob
scrub re-hashes the next few versions' blobs (``LORAFLEET_SCRUB_*``, off with a budget of 0; docs/operations.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import timedelta

from lorafleet.config import load_settings
from lorafleet.errors import LorafleetError
from lorafleet.jobs.scheduler import SchedulerPolicy
from lorafleet.runtime.job_commands import scheduler_run, scheduler_tick
from lorafleet.runtime.process import configure_logging, on_stop_signals, process_parser

logger = logging.getLogger("lorafleet.scheduler")
_DEFAULTS = SchedulerPolicy()


def _parser() -> argparse.ArgumentParser:
    parser = process_parser("python -m services.scheduler", __doc__)
    parser.add_argument("--once", action="store_true", help="run one tick and exit")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between ticks (default 60)")
    parser.add_argument("--min-new-records", type=int, default=_DEFAULTS.min_new_records)
    parser.add_argument(
        "--max-staleness",
        type=float,
        default=_DEFAULTS.max_staleness.total_seconds(),
        help="seconds a new record may wait before its user is due anyway",
    )
    parser.add_argument("--users-per-job", type=int, default=_DEFAULTS.users_per_job)
    parser.add_argument("--max-active-jobs", type=int, default=_DEFAULTS.max_active_jobs)
    return parser


def _policy(args: argparse.Namespace) -> SchedulerPolicy:
    return SchedulerPolicy(
        min_new_records=args.min_new_records,
        max_staleness=timedelta(seconds=args.max_staleness),
        users_per_job=args.users_per_job,
        max_active_jobs=args.max_active_jobs,
    )


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int) -> None:
        logger.info("received %s; stopping after the current tick", signal.Signals(signum).name)
        stop.set()

    on_stop_signals(handle)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        settings, policy = load_settings(), _policy(args)
        if args.once:
            result = scheduler_tick(settings, policy=policy)
            logger.info(
                "created %d jobs; due=%d skipped=%s",
                len(result.jobs_created),
                result.due_users,
                result.skipped,
            )
            return 0
        stop = threading.Event()
        _stop_on_signals(stop)
        ticks = scheduler_run(settings, interval=args.interval, stop_event=stop, policy=policy)
        logger.info("scheduler stopped after %d ticks", ticks)
        return 0
    except LorafleetError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
