"""A running job's progress as its handler reports it: phase, step, total steps, per-subject loss and an ETA.

Handlers may report every training step; ``ProgressReporter`` writes (through the caller's ``write``, which
goes through the lease fence) only when it is due: the first step, the final step, a phase change, or
``min_interval`` seconds after the previous write. So the job row changes at most every couple of seconds
however fast the steps are, and a watcher still sees the start and the end. Each report also holds ``curves``:
every subject's loss by step (``[[step, loss], ...]``), thinned to at most ``MAX_CURVE_POINTS`` points (every
other point is dropped when full; the newest step is always kept), which the console draws as training-loss
curves. Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from lorafleet.errors import ValidationError

PHASE_PLANNING = "planning"
PHASE_TRAINING = "training"
PHASE_EVALUATING = "evaluating"
PHASE_REGISTERING = "registering"
#: the phases a ``train`` job goes through, in order (other job kinds may name their own)
TRAIN_PHASES = (PHASE_PLANNING, PHASE_TRAINING, PHASE_EVALUATING, PHASE_REGISTERING)
#: seconds between two progress writes of one job (phase changes and the final step are written at once)
DEFAULT_MIN_INTERVAL = 2.0
MAX_PHASE_LENGTH = 32
#: points kept per subject's loss curve in a job's progress (a few KB of JSON for a batch of 16 subjects)
MAX_CURVE_POINTS = 128

Write = Callable[[dict[str, Any]], None]
#: ``progress(step, total, {"loss", "lr", "losses"})``, as ``lorafleet.training.trainer.train_slots`` calls it
TrainerCallback = Callable[[int, int, dict[str, Any]], None]


class ProgressReporter:
    """Keeps a job's latest progress and writes it when due; ``clock`` is a monotonic clock in seconds."""

    def __init__(
        self,
        *,
        write: Write,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not math.isfinite(min_interval) or min_interval < 0:
            raise ValidationError("min_interval: must be a finite number of seconds, at least 0")
        self._write = write
        self._min_interval = min_interval
        self._clock = clock
        self._state: dict[str, Any] = {}
        self._last_write: float | None = None
        self._written_step: int | None = None
        self._anchor: tuple[float, int] | None = None
        self._curves: dict[str, list[list[float]]] = {}

    @property
    def state(self) -> dict[str, Any]:
        """The latest progress (written or not), as it would be stored."""
        return dict(self._state)

    def phase(self, name: str) -> None:
        """Enter phase ``name`` (e.g. ``planning``); a change is written at once."""
        if self._state.get("phase") == _check_phase(name):
            return
        self._state["phase"] = name
        self._flush(self._clock())

    def step(
        self,
        *,
        step: int,
        total: int,
        losses: Mapping[str, float],
        loss: float | None = None,
        phase: str | None = None,
    ) -> bool:
        """Record that ``step`` of ``total`` steps is done, with each subject's loss (labels as the jobs
        listing names subjects) and optionally a new phase; True when this report was written."""
        if not 0 <= step <= total or total < 1:
            raise ValidationError(f"step: need 0 <= step <= total and total >= 1, got {step}/{total}")
        now = self._clock()
        if self._anchor is None or step <= self._anchor[1]:
            self._anchor = (now, step)  # the first report of a run: the ETA is measured from here
            self._curves = {}
        changed = phase is not None and _check_phase(phase) != self._state.get("phase")
        if phase is not None:
            self._state["phase"] = phase
        self._state.update(
            step=step,
            total_steps=total,
            fraction=step / total,
            loss=finite_or_none(loss),
            losses={str(key): finite_or_none(value) for key, value in losses.items()},
            eta_seconds=self._eta(now, step=step, total=total),
            curves=self._grow_curves(step, losses),
        )
        if not (changed or step == total or self._written_step is None or self._interval_passed(now)):
            return False
        self._flush(now)
        self._written_step = step
        return True

    def _grow_curves(self, step: int, losses: Mapping[str, float]) -> dict[str, list[list[float]]]:
        """Each subject's ``[step, loss]`` points with this step's finite losses added (thinned when full)."""
        for key, value in losses.items():
            loss = finite_or_none(value)
            if loss is None:
                continue
            points = self._curves.setdefault(str(key), [])
            if len(points) >= MAX_CURVE_POINTS:
                points[:] = points[::2]
            points.append([step, loss])
        return {key: [list(p) for p in points] for key, points in self._curves.items()}

    def _interval_passed(self, now: float) -> bool:
        return self._last_write is None or now - self._last_write >= self._min_interval

    def _eta(self, now: float, *, step: int, total: int) -> float | None:
        """Seconds left at the pace since the first report; None until a second step was reported."""
        assert self._anchor is not None
        started, first = self._anchor
        if step >= total:
            return 0.0
        if step <= first:
            return None
        return round((now - started) / (step - first) * (total - step), 3)

    def _flush(self, now: float) -> None:
        self._last_write = now
        self._write(dict(self._state))


def trainer_callback(
    report_step: Callable[..., object], *, also: TrainerCallback | None = None
) -> TrainerCallback:
    """The trainer's per-step callback as job progress: each step to ``report_step`` (``LeaseContext``'s,
    which throttles) and to ``also``; the final step enters ``evaluating`` (the holdouts are scored next)."""

    def report(step: int, total: int, values: dict[str, Any]) -> None:
        if also is not None:
            also(step, total, values)
        phase = PHASE_EVALUATING if step >= total else None
        losses = values.get("losses") or {}
        report_step(step=step, total=total, loss=values.get("loss"), losses=losses, phase=phase)

    return report


def _check_phase(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_PHASE_LENGTH or not name.isprintable():
        raise ValidationError(f"phase: must be a printable string of 1 to {MAX_PHASE_LENGTH} characters")
    return name


def finite_or_none(value: object) -> float | None:
    """A finite number as float; anything else (NaN, inf, None, text) as None, so a report stays JSON."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


__all__ = [
    "DEFAULT_MIN_INTERVAL",
    "MAX_CURVE_POINTS",
    "PHASE_EVALUATING",
    "PHASE_PLANNING",
    "PHASE_REGISTERING",
    "PHASE_TRAINING",
    "TRAIN_PHASES",
    "ProgressReporter",
    "TrainerCallback",
    "finite_or_none",
    "trainer_callback",
]
