"""QA reports: the full document as a JSON blob in the object store, a row in the metadata store, and a table.

The document (``REPORT_FORMAT``) holds the policy, the sanity checks, the bank and how it was sampled, the
matrix with its greedy samples, every rule's outcome, the decision and its reasons, and timings. It is written
blob first (content-addressed, canonical JSON), then the row, whose ``blob_sha256`` keeps the blob from the
registry's garbage collector. ``format_report`` renders a report as the table ``lorafleet qa report`` prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lorafleet.errors import ValidationError
from lorafleet.qa.facts import answers_kept
from lorafleet.qa.results import Answers, Cell, Matrix
from lorafleet.registry import Registry
from lorafleet.store.blob.base import BlobRef
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import QAReport, QARepository

REPORT_FORMAT = "lorafleet-qa-report/1"
_SAMPLES_SHOWN = 2


def encode_document(document: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no NaN): the same document always has the same sha256."""
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"QA report is not JSON (finite numbers, string keys): {exc}") from exc


def store_document(registry: Registry, document: Mapping[str, Any]) -> BlobRef:
    """Write the document blob (before its row: a crash leaves an orphan blob the GC removes)."""
    return registry.blobs.put_bytes(encode_document(document))


def load_report(
    db: Database, registry: Registry, *, report_id: int, tenant_id: int | None = None
) -> tuple[QAReport, dict[str, Any]]:
    """The report row and its document (sha256- and size-verified); ``tenant_id`` None: any tenant."""
    report = db.run(QARepository(dialect=db.dialect).get_report, tenant_id=tenant_id, report_id=report_id)
    data = registry.blobs.get_bytes(report.blob_sha256, expected_size=report.blob_size_bytes)
    return report, dict(json.loads(data))


def reports_for_version(db: Database, *, tenant_id: int, version_id: int) -> list[QAReport]:
    """Every QA report on a version, oldest first."""
    found = db.run(
        QARepository(dialect=db.dialect).reports_for_versions, tenant_id=tenant_id, version_ids=[version_id]
    )
    return found.get(version_id, [])


# --- the table ------------------------------------------------------------------------------------------------
def format_report(report: QAReport, document: Mapping[str, Any]) -> str:
    """A report as text: header, reasons, sanity, bank, the matrix (loss / token accuracy) and a few samples."""
    lines = _header(report, document)
    matrix_json = document.get("matrix")
    if matrix_json:
        matrix = Matrix.from_json(matrix_json)
        weight = float((document.get("policy") or {}).get("wrong_answer_weight", 0.0))
        lines += ["", *_table(matrix), "", *_answer_lines(matrix.answers, weight), *_samples(matrix)]
    for trial in document.get("rollback", {}).get("trials", []):
        verdict = "passes" if trial["passed"] else "fails"
        lines.append(f"rollback trial: version {trial['number']} {verdict}: {'; '.join(trial['reasons'])}")
    return "\n".join(lines).rstrip() + "\n"


def _header(report: QAReport, document: Mapping[str, Any]) -> list[str]:
    version = document.get("version", {})
    subject = (
        f"version {version.get('number')} (id {report.version_id}) of adapter {version.get('adapter_name')!r}"
    )
    owner = document.get("bank", {}).get("user")
    lines = [
        f"QA report {report.id}: {report.kind} {subject}" + (f" of user {owner!r}" if owner else ""),
        f"decision: {report.decision.upper()}   policy: {report.policy_version}   job: {report.job_id}   "
        f"at {report.created_at:%Y-%m-%d %H:%M:%S} UTC",
        "reasons:",
        *(f"  - {r}" for r in report.reasons),
    ]
    sanity = document.get("sanity", {})
    norm = sanity.get("max_update_norm")
    lines.append(
        f"sanity: {'passed' if sanity.get('passed') else 'FAILED'}" + _maybe(" (max update norm", norm)
    )
    sampling = document.get("bank", {}).get("sampling")
    if sampling:
        left = sampling["left_out"]
        lines.append(
            f"bank: {sampling['bank_size']} other members, {len(sampling['sampled'])} evaluated (budget "
            f"{sampling['budget']})" + (f", left out: {', '.join(left)}" if left else "")
        )
    return lines


def _maybe(prefix: str, value: float | None) -> str:
    return "" if value is None else f"{prefix} {value:.4g})"


def _table(matrix: Matrix) -> list[str]:
    """Rows = evaluation sets, columns = configurations; each cell ``loss / token accuracy``."""
    header = ["set (examples)", *matrix.column_names()]
    body = [
        [
            f"{row.name} ({row.examples}/{row.total})",
            *(_cell_text(matrix.cell(row.name, c)) for c in header[1:]),
        ]
        for row in matrix.rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    render = [
        " | ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)) for line in [header, *body]
    ]
    return [
        render[0],
        "-+-".join("-" * w for w in widths),
        *render[1:],
        "cells: loss (nats/token) / token accuracy",
    ]


def _cell_text(cell: Cell | None) -> str:
    if cell is None or not math.isfinite(cell.loss):
        return "-"
    return f"{cell.loss:.3f} / {cell.token_accuracy:.0%}"


def _samples(matrix: Matrix) -> list[str]:
    """A few greedy samples of the candidate's own set, per configuration."""
    own = next((r for r in matrix.rows if r.own), None)
    if own is None:
        return []
    lines = [f"greedy samples on {own.name}:"]
    for column in matrix.column_names():
        cell = matrix.cell(own.name, column)
        for sample in (cell.samples if cell else ())[:_SAMPLES_SHOWN]:
            lines.append(
                f"  [{column}] {_one_line(sample.prompt)} -> {_one_line(sample.output)!r} "
                f"(expected {_one_line(sample.expected)!r})"
            )
    return lines


def answer_figures(answers: Answers | None, *, wrong_answer_weight: float = 0.0) -> dict[str, Any] | None:
    """The answer-level figures of a report (None when nothing was answered): mean answer F1 and exact match of
    subject and reference (answer F1), the count of answers each way, the signed-rank test's p-value, and the
    subject's answers on its own training examples (how many, how many answer another question, answer F1), and
    the general questions with known answers (how many asked, how many the base and the subject answer right).
    The scores, counts and test read a preference pair as the answers rule does (``preference_pairs`` of them)."""
    if answers is None or not answers.items:
        return None
    trained = answers.training_scores()
    general = answers_kept(answers)
    rejected = answers.rejected()
    # as the answers rule scores them: a pair by the side it is nearer
    scores = answers.holdout_scores(wrong_answer_weight=wrong_answer_weight)
    return {
        "set": answers.row,
        "source": answers.source,
        "reference": answers.reference,
        "answers": scores.n,
        "preference_pairs": sum(r is not None for r in rejected),
        "answer_f1": round(scores.subject.mean_f1, 4),
        "reference_answer_f1": round(scores.reference.mean_f1, 4),
        "exact_match": round(scores.subject.exact_rate, 4),
        "reference_exact_match": round(scores.reference.exact_rate, 4),
        "answer_score": round(scores.subject.mean_score, 4),
        "reference_answer_score": round(scores.reference.mean_score, 4),
        "wrong_answers": scores.subject.wrong,
        "reference_wrong_answers": scores.reference.wrong,
        "better": scores.wins,
        "worse": scores.losses,
        "p_value": round(scores.p_value, 6),
        "training_answers": trained.n,
        "training_wrong_answers": trained.wrong,
        "training_answer_f1": None if not trained.n else round(trained.mean_f1, 4),
        "general_facts": general.asked,
        "general_facts_base_right": len(general.base_right),
        "general_facts_kept": len(general.kept),
        "nonfinite": dict(answers.nonfinite),
    }


def _answer_lines(answers: Answers | None, wrong_answer_weight: float) -> list[str]:
    figures = answer_figures(answers, wrong_answer_weight=wrong_answer_weight)
    if figures is None:
        return []
    return [
        f"answers on {figures['set']} ({figures['answers']}, {figures['source']}): answer F1 {figures['answer_f1']:.2f} "
        f"vs {figures['reference']} {figures['reference_answer_f1']:.2f}, exact match {figures['exact_match']:.2f} "
        f"vs {figures['reference_exact_match']:.2f}, {figures['wrong_answers']} answering another question, "
        f"{figures['better']} better / {figures['worse']} worse, "
        f"signed-rank p={figures['p_value']:.3g}"
        + (
            f" ({figures['preference_pairs']} preference pairs, each scored by its F1 to the chosen answer less "
            f"its F1 to the rejected one)"
            if figures["preference_pairs"]
            else ""
        ),
        *(
            [
                f"answers on {figures['training_answers']} of its own training examples: "
                f"{figures['training_wrong_answers']} answering another question, answer F1 "
                f"{figures['training_answer_f1']:.2f}"
            ]
            if figures["training_answers"]
            else []
        ),
        *(
            [
                f"general questions with known answers: {figures['general_facts_kept']} of the "
                f"{figures['general_facts_base_right']} the base answers right still right "
                f"({figures['general_facts']} asked)"
            ]
            if figures["general_facts"]
            else []
        ),
        "",
    ]


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def summary_of(
    matrix: Matrix | None,
    rules: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any],
    *,
    wrong_answer_weight: float = 0.0,
) -> dict[str, Any]:
    """The row's ``summary``: sizes, the own set's key losses, each rule's outcome and the answer figures (scored
    at the policy's ``wrong_answer_weight``)."""
    out: dict[str, Any] = {"rules": {r["rule"]: r["passed"] for r in rules}, **extra}
    if matrix is None:
        return out
    out.update(rows=len(matrix.rows), columns=len(matrix.columns))
    own = next((r for r in matrix.rows if r.own), None)
    if own is not None:
        losses = {
            c: matrix.loss(own.name, c)
            for c in matrix.column_names()
            if ":" not in c or c.startswith("gated")
        }
        out["own_set"] = {"name": own.name, "examples": own.examples}
        out["own_losses"] = {c: (v if math.isfinite(v) else None) for c, v in losses.items()}
    figures = answer_figures(matrix.answers, wrong_answer_weight=wrong_answer_weight)
    if figures is not None:
        out["answers"] = figures
    return out


__all__ = [
    "REPORT_FORMAT",
    "answer_figures",
    "encode_document",
    "format_report",
    "load_report",
    "reports_for_version",
    "store_document",
    "summary_of",
]
