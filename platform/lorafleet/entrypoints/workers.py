"""``lorafleet workers``: trainer actors on the configured Ray, running queued jobs until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from typing import Any

from lorafleet.config import load_settings
from lorafleet.errors import ValidationError
from lorafleet.runtime.job_commands import run_workers
from lorafleet.runtime.process import on_stop_signals
from lorafleet.runtime.ray_runtime import init_ray
from lorafleet.training.config import TrainingConfig

logger = logging.getLogger("lorafleet.workers")


def workers_command(args: argparse.Namespace) -> int:
    """``lorafleet workers``: trainer actors on the configured Ray, draining the job queue until SIGTERM or
    SIGINT (a second signal stops at once; a job cut short is retried once its lease expires)."""
    if args.poll_seconds <= 0 or args.grace_seconds < 0:
        raise ValidationError("--poll-seconds must be positive and --grace-seconds not negative")
    settings = load_settings()
    training = _json_object("--training", args.training)
    TrainingConfig.from_mapping(training)  # refuse bad overrides here, not in every actor
    init_ray(settings)  # first: Ray installs its own SIGTERM handler, which the next line replaces
    stop = threading.Event()
    _stop_on_signals(stop)
    logger.info(
        "trainer workers: %d actor(s) on %s, database %s, object store %s, device %s, resource %s",
        args.count,
        f"the Ray cluster at {settings.ray_address}" if settings.ray_address else "a local Ray (loopback)",
        settings.resolved_database_url.split("@")[-1],
        settings.resolved_object_store_url,
        settings.device,
        settings.trainer_resource or "(none)",
    )
    try:
        ran = run_workers(
            settings,
            n_actors=args.count,
            until_idle=args.until_idle,
            stop_event=stop,
            poll_seconds=args.poll_seconds,
            training=training,
            grace_seconds=args.grace_seconds,
            start_timeout=args.start_timeout,
        )
    except KeyboardInterrupt:
        logger.warning("trainer workers stopped at once (jobs cut short are retried after their leases)")
        return 130
    logger.info("trainer workers stopped after %d job(s): %s", len(ran), ran)
    return 0


def _json_object(option: str, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{option}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{option}: must be a JSON object")
    return value


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop`` (jobs in flight get their grace period); a second one stops at once."""

    def handle(signum: int) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.info("signal %d: stopping the trainer workers (send it again to stop at once)", signum)
        stop.set()

    on_stop_signals(handle)
