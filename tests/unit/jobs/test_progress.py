"""ProgressReporter: which reports are written (first, final, phase changes, then at most every interval),
what a report holds (fraction, per-subject losses, ETA at the pace so far), and the trainer callback."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lorafleet.errors import ValidationError
from lorafleet.jobs.progress import MAX_CURVE_POINTS, ProgressReporter, trainer_callback


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reporter(interval: float = 2.0) -> tuple[ProgressReporter, list[dict[str, Any]], Ticks]:
    written: list[dict[str, Any]] = []
    ticks = Ticks()
    return ProgressReporter(write=written.append, min_interval=interval, clock=ticks), written, ticks


def test_steps_are_written_first_last_and_at_most_every_interval() -> None:
    reporter, written, ticks = _reporter(interval=2.0)
    for step in range(1, 11):  # a step every 0.5 s
        reporter.step(step=step, total=10, losses={"ann": 1.0 / step})
        ticks.now += 0.5
    assert [w["step"] for w in written] == [1, 5, 9, 10]
    assert written[-1]["fraction"] == 1.0 and written[-1]["eta_seconds"] == 0.0


def test_a_report_holds_fraction_losses_and_the_eta_at_the_pace_so_far() -> None:
    reporter, written, ticks = _reporter(interval=0.0)
    reporter.step(step=1, total=5, losses={"ann": 2.0, "task:pig-latin": 3.0}, loss=2.5)
    assert written[0]["eta_seconds"] is None  # one step gives no pace yet
    ticks.now += 3.0
    reporter.step(step=3, total=5, losses={"ann": 1.0, "task:pig-latin": float("nan")}, loss=math.inf)
    assert written[1] == {
        "step": 3,
        "total_steps": 5,
        "fraction": 0.6,
        "loss": None,  # not finite: stored as null, the report stays JSON
        "losses": {"ann": 1.0, "task:pig-latin": None},
        "eta_seconds": 3.0,  # 1.5 s a step since step 1, two steps left
        "curves": {"ann": [[1, 2.0], [3, 1.0]], "task:pig-latin": [[1, 3.0]]},  # finite losses only
    }


def test_loss_curves_keep_every_step_thinned_to_a_bounded_size_with_the_newest_kept() -> None:
    reporter, written, _ticks = _reporter(interval=0.0)
    total = 3 * MAX_CURVE_POINTS
    for step in range(1, total + 1):
        reporter.step(step=step, total=total, losses={"ann": 1.0 / step})
    curve = written[-1]["curves"]["ann"]
    assert MAX_CURVE_POINTS // 2 <= len(curve) <= MAX_CURVE_POINTS
    assert curve[0] == [1, 1.0] and curve[-1] == [total, 1.0 / total]
    steps = [point[0] for point in curve]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert all(loss == 1.0 / step for step, loss in curve)
    reporter.step(step=1, total=2, losses={"ann": 5.0})  # a new run (a retry) starts its curves afresh
    assert written[-1]["curves"] == {"ann": [[1, 5.0]]}


def test_phase_changes_are_written_at_once_and_kept_with_the_steps() -> None:
    reporter, written, _ticks = _reporter(interval=60.0)
    reporter.phase("planning")
    reporter.phase("planning")  # no change, no write
    reporter.phase("training")
    reporter.step(step=1, total=4, losses={"ann": 1.0})
    reporter.step(step=2, total=4, losses={"ann": 0.9})  # throttled
    reporter.step(step=3, total=4, losses={"ann": 0.8}, phase="evaluating")  # a phase change: written
    reporter.phase("registering")
    assert [(w.get("phase"), w.get("step")) for w in written] == [
        ("planning", None),
        ("training", None),
        ("training", 1),
        ("evaluating", 3),
        ("registering", 3),
    ]
    assert reporter.state["phase"] == "registering"


@pytest.mark.parametrize(
    ("step", "total"),
    [(-1, 4), (5, 4), (1, 0)],
)
def test_impossible_steps_are_refused(step: int, total: int) -> None:
    reporter, written, _ticks = _reporter()
    with pytest.raises(ValidationError, match="step"):
        reporter.step(step=step, total=total, losses={})
    assert written == []


def test_bad_phases_and_intervals_are_refused() -> None:
    reporter, _written, _ticks = _reporter()
    with pytest.raises(ValidationError, match="phase"):
        reporter.phase("")
    with pytest.raises(ValidationError, match="min_interval"):
        ProgressReporter(write=lambda _: None, min_interval=-1.0)


def test_the_trainer_callback_reports_each_step_and_enters_evaluating_at_the_last() -> None:
    seen: list[tuple[int, int]] = []
    reports: list[dict[str, Any]] = []

    def report_step(**kwargs: Any) -> None:
        reports.append(kwargs)

    callback = trainer_callback(report_step, also=lambda step, total, values: seen.append((step, total)))
    callback(1, 2, {"loss": 1.5, "lr": 1e-3, "losses": {"ann": 1.5}})
    callback(2, 2, {"loss": 1.2, "lr": 0.0, "losses": {"ann": 1.2}})
    assert seen == [(1, 2), (2, 2)]
    assert reports == [
        {"step": 1, "total": 2, "loss": 1.5, "losses": {"ann": 1.5}, "phase": None},
        {"step": 2, "total": 2, "loss": 1.2, "losses": {"ann": 1.2}, "phase": "evaluating"},
    ]
