"""The QA matrix as plain data: rows (evaluation sets), columns (configurations) and cells (metrics, samples).

Torch-free, so rules, reports and the command line read a matrix without loading a model. A matrix round-trips
through JSON (``to_json`` / ``from_json``); NaN (an empty set) is stored as ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lorafleet.qa.answers import PairedScores, TrainingAnswers, paired_scores, training_answers

RowKind = Literal["user-holdout", "task-holdout", "probe", "training"]
ColumnKind = Literal["base", "previous", "candidate", "gated-previous", "gated-candidate", "alone", "pair"]

BASE = "base"
PREVIOUS = "previous"
CANDIDATE = "candidate"
GATED_PREVIOUS = "gated:previous"
GATED_CANDIDATE = "gated:candidate"
PROBE = "probe"


@dataclass(frozen=True)
class RowInfo:
    """An evaluation set: ``examples`` scored out of ``total`` available (capped by the policy)."""

    name: str
    kind: RowKind
    examples: int
    total: int
    adapter_id: int | None = None
    #: the candidate's own holdout (the set the ``user-holdout`` rule reads)
    own: bool = False


@dataclass(frozen=True)
class ColumnInfo:
    """A configuration; ``member`` is the bank member label of ``alone``/``pair`` columns."""

    name: str
    kind: ColumnKind
    member: str | None = None


@dataclass(frozen=True)
class Sample:
    """One greedy generation kept for inspection."""

    prompt: str
    expected: str
    output: str


@dataclass(frozen=True)
class Cell:
    """Teacher-forced loss and token accuracy of one configuration on one set, plus greedy samples."""

    loss: float
    token_accuracy: float
    tokens: int
    examples: int
    samples: tuple[Sample, ...] = ()
    #: scored positions whose logits held a NaN or an infinity (any is a broken adapter)
    nonfinite: int = 0
    #: the loss over the answers' body: every answer token but each answer's first and its end of turn
    #: (``EvalResult.body_loss``; NaN in reports written before it was recorded)
    body_loss: float = math.nan


@dataclass(frozen=True)
class AnswerItem:
    """One holdout example answered greedily by each compared column (``outputs[column]``); ``rejected``: the
    answer the user ranked below ``expected`` when the example is a preference pair."""

    prompt: str
    expected: str
    outputs: dict[str, str]
    rejected: str | None = None


@dataclass(frozen=True)
class Answers:
    """Answer-level evidence on the candidate's own holdout: every example (capped as the row is) decoded
    greedily by ``subject`` (the candidate) and ``reference`` (the previous live version, or the base model).
    ``nonfinite[column]``: answers whose decoding met logits with a NaN or an infinity."""

    row: str
    subject: str
    reference: str
    items: tuple[AnswerItem, ...]
    nonfinite: dict[str, int] = field(default_factory=dict)
    #: where the examples came from (``holdout``, ``import-examples``, ...), for the report
    source: str = "holdout"
    #: examples of the candidate's own training split answered greedily by ``subject`` alone (the
    #: ``training-answers`` rule's evidence; empty when it had none)
    training: tuple[AnswerItem, ...] = ()
    #: general questions with known answers (``lorafleet.qa.facts``), answered greedily by ``subject`` alone and
    #: by the base model (``outputs`` keys ``subject`` and ``base``; ``expected``: the known answer's first form);
    #: the ``general-facts`` rule's evidence, empty when none were asked
    general: tuple[AnswerItem, ...] = ()

    def outputs(self, column: str) -> list[str]:
        return [item.outputs.get(column, "") for item in self.items]

    def targets(self) -> list[str]:
        return [item.expected for item in self.items]

    def rejected(self) -> list[str | None]:
        """Per item, the answer its user rejected (None: not a preference pair)."""
        return [item.rejected for item in self.items]

    def holdout_scores(self, *, wrong_answer_weight: float = 0.0) -> PairedScores:
        """The subject's and the reference's holdout answers scored against the targets, a preference pair by
        the side it is nearer (``paired_scores``): what the answers rule decides on and the report shows."""
        return paired_scores(
            self.outputs(self.subject),
            self.outputs(self.reference),
            self.targets(),
            [item.prompt for item in self.items],
            wrong_answer_weight=wrong_answer_weight,
            rejected=self.rejected(),
        )

    def training_scores(self) -> TrainingAnswers:
        """The subject's answers on its own training examples (``training_answers``)."""
        return training_answers(
            [item.outputs.get(self.subject, "") for item in self.training],
            [item.expected for item in self.training],
            [item.prompt for item in self.training],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "subject": self.subject,
            "reference": self.reference,
            "source": self.source,
            "nonfinite": dict(self.nonfinite),
            "items": [_item_json(i) for i in self.items],
            "training": [_item_json(i) for i in self.training],
            "general": [_item_json(i) for i in self.general],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Answers:
        def items(key: str) -> tuple[AnswerItem, ...]:
            return tuple(
                AnswerItem(i["prompt"], i["expected"], dict(i["outputs"]), i.get("rejected"))
                for i in data.get(key, [])
            )

        return cls(
            data["row"],
            data["subject"],
            data["reference"],
            items("items"),
            {str(k): int(v) for k, v in dict(data.get("nonfinite", {})).items()},
            str(data.get("source", "holdout")),
            items("training"),
            items("general"),
        )


@dataclass(frozen=True)
class Preferences:
    """Preference evidence on the candidate's own holdout: its held-out preference pairs scored by each compared
    column. A pair is ranked right when its implicit reward margin against the base, ``beta * ((log p(chosen) -
    log base(chosen)) - (log p(rejected) - log base(rejected)))``, is > 0; ``accuracy[column]`` is the share ranked
    right (a tie counts a half: the base scores 0.5), ``margin[column]`` the mean margin."""

    row: str
    pairs: int
    beta: float
    accuracy: dict[str, float]
    margin: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "pairs": self.pairs,
            "beta": self.beta,
            "accuracy": {k: finite_or_none(v) for k, v in self.accuracy.items()},
            "margin": {k: finite_or_none(v) for k, v in self.margin.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preferences:
        def numbers(key: str) -> dict[str, float]:
            return {str(k): math.nan if v is None else float(v) for k, v in dict(data.get(key, {})).items()}

        return cls(
            str(data["row"]), int(data["pairs"]), float(data["beta"]), numbers("accuracy"), numbers("margin")
        )


@dataclass(frozen=True)
class Matrix:
    """Rows x columns of cells (``cells[row][column]``)."""

    rows: tuple[RowInfo, ...]
    columns: tuple[ColumnInfo, ...]
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)
    #: greedy answers on the own holdout (candidates only; None in rechecks and when there was nothing to decode)
    answers: Answers | None = None
    #: held-out preference pairs scored (candidates trained with DPO and holding such pairs; else None)
    preferences: Preferences | None = None

    def cell(self, row: str, column: str) -> Cell | None:
        return self.cells.get(row, {}).get(column)

    def loss(self, row: str, column: str) -> float:
        """The cell's loss, NaN when the cell is missing or its set was empty."""
        found = self.cell(row, column)
        return math.nan if found is None else found.loss

    def body_loss(self, row: str, column: str) -> float:
        """The cell's loss over the answers' body (``Cell.body_loss``), NaN when missing or not recorded."""
        found = self.cell(row, column)
        return math.nan if found is None else found.body_loss

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def has_column(self, name: str) -> bool:
        return any(c.name == name for c in self.columns)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [_row_json(r) for r in self.rows],
            "columns": [{"name": c.name, "kind": c.kind, "member": c.member} for c in self.columns],
            "cells": {r: {c: _cell_json(cell) for c, cell in cols.items()} for r, cols in self.cells.items()},
            "answers": None if self.answers is None else self.answers.to_json(),
            "preferences": None if self.preferences is None else self.preferences.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Matrix:
        rows = tuple(
            RowInfo(
                r["name"],
                r["kind"],
                int(r["examples"]),
                int(r["total"]),
                r.get("adapter_id"),
                r.get("own", False),
            )
            for r in data.get("rows", [])
        )
        columns = tuple(ColumnInfo(c["name"], c["kind"], c.get("member")) for c in data.get("columns", []))
        cells = {
            r: {c: _cell_from_json(cell) for c, cell in cols.items()}
            for r, cols in dict(data.get("cells", {})).items()
        }
        answers, preferences = data.get("answers"), data.get("preferences")
        return cls(
            rows,
            columns,
            cells,
            None if answers is None else Answers.from_json(answers),
            None if preferences is None else Preferences.from_json(preferences),
        )


def _item_json(item: AnswerItem) -> dict[str, Any]:
    out = {"prompt": item.prompt, "expected": item.expected, "outputs": dict(item.outputs)}
    if item.rejected is not None:  # a preference pair (reports written before pairs were judged have none)
        out["rejected"] = item.rejected
    return out


def finite_or_none(value: float) -> float | None:
    """A JSON-safe number: NaN and infinities become None."""
    return float(value) if math.isfinite(value) else None


def _row_json(row: RowInfo) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": row.kind,
        "examples": row.examples,
        "total": row.total,
        "adapter_id": row.adapter_id,
        "own": row.own,
    }


def _cell_json(cell: Cell) -> dict[str, Any]:
    return {
        "loss": finite_or_none(cell.loss),
        "token_accuracy": finite_or_none(cell.token_accuracy),
        "tokens": cell.tokens,
        "examples": cell.examples,
        "samples": [{"prompt": s.prompt, "expected": s.expected, "output": s.output} for s in cell.samples],
        "nonfinite": cell.nonfinite,
        "body_loss": finite_or_none(cell.body_loss),
    }


def _cell_from_json(data: Mapping[str, Any]) -> Cell:
    def number(key: str) -> float:
        value = data.get(key)
        return math.nan if value is None else float(value)

    samples = tuple(Sample(s["prompt"], s["expected"], s["output"]) for s in data.get("samples", []))
    return Cell(
        number("loss"),
        number("token_accuracy"),
        int(data["tokens"]),
        int(data["examples"]),
        samples,
        int(data.get("nonfinite", 0)),
        number("body_loss"),
    )


__all__ = [
    "AnswerItem",
    "Answers",
    "BASE",
    "CANDIDATE",
    "GATED_CANDIDATE",
    "GATED_PREVIOUS",
    "PREVIOUS",
    "PROBE",
    "Cell",
    "Preferences",
    "ColumnInfo",
    "ColumnKind",
    "Matrix",
    "RowInfo",
    "RowKind",
    "Sample",
    "finite_or_none",
]
