"""Run the API with uvicorn: ``python -m services.api [--host 127.0.0.1] [--port 8000] [--trainer-actors N]``.

Settings (database, object store, Ray, backbone, admin key) come from the ``LORAFLEET_*`` environment. With
``--scheduler`` and ``--trainer-actors N`` the process also runs the continual-learning scheduler loop and N Ray
trainer actors, so one process is the whole service.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from lorafleet.config import load_settings
from lorafleet.errors import LorafleetError
from lorafleet.runtime.process import configure_logging, process_parser
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS
from services.api.app import create_app
from services.api.runtime import ApiOptions

logger = logging.getLogger("lorafleet.api")
_DEFAULTS = ApiOptions()


def _parser() -> argparse.ArgumentParser:
    parser = process_parser("python -m services.api", __doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--scheduler", action="store_true", help="run the scheduler loop in this process")
    parser.add_argument("--scheduler-interval", type=float, default=_DEFAULTS.scheduler_interval)
    parser.add_argument("--trainer-actors", type=int, default=0, help="Ray trainer actors to run (default 0)")
    parser.add_argument("--preload-engine", action="store_true", help="load the serving engine at start")
    parser.add_argument("--migrate", action="store_true", help="upgrade the database schema at start")
    parser.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes)
    return parser


def _options(args: argparse.Namespace) -> ApiOptions:
    return ApiOptions(
        run_scheduler=args.scheduler,
        scheduler_interval=args.scheduler_interval,
        run_workers=args.trainer_actors,
        preload_engine=args.preload_engine,
        migrate=args.migrate,
        max_body_bytes=args.max_body_bytes,
        training=SERVICE_TRAINING_DEFAULTS,  # under every tenant's overrides
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        app = create_app(load_settings(), options=_options(args))
    except LorafleetError as exc:
        logger.error("%s", exc)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
