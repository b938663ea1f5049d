"""QA: every adapter version is evaluated in the combinations it is served in before it reaches users.

Public API (names load on first use, so importing this package does not import torch):

- ``QAPolicy``: thresholds, budgets and seeds, versioned in every report (``policy``)
- ``QARunner``: the ``qa`` job handler; ``run_candidate`` / ``run_recheck`` for direct calls (``runner``)
- ``on_bank_changed``, ``on_task_adapter_changed``, ``enrol_and_recheck``, ``submit_candidate_qa``,
  ``QA_JOB_KIND`` (``triggers``)
- ``load_report``, ``format_report``, ``reports_for_version`` (``reports``); ``QAReport`` rows
- ``probe_examples`` (``probe``), ``check_adapter`` (``sanity``), ``Matrix`` (``results``), the rules (``rules``)
"""

from __future__ import annotations

from typing import Any

from lorafleet._exports import lazy_export

_EXPORTS = {
    "QAPolicy": "lorafleet.qa.policy",
    "QARunner": "lorafleet.qa.runner",
    "StaleEvaluationError": "lorafleet.qa.runner",
    "QA_JOB_KIND": "lorafleet.qa.triggers",
    "on_bank_changed": "lorafleet.qa.triggers",
    "on_task_adapter_changed": "lorafleet.qa.triggers",
    "enrol_and_recheck": "lorafleet.qa.triggers",
    "submit_candidate_qa": "lorafleet.qa.triggers",
    "load_report": "lorafleet.qa.reports",
    "format_report": "lorafleet.qa.reports",
    "reports_for_version": "lorafleet.qa.reports",
    "QAReport": "lorafleet.store.sql.qa_repository",
    "probe_examples": "lorafleet.qa.probe",
    "check_adapter": "lorafleet.qa.sanity",
    "Matrix": "lorafleet.qa.results",
    "RuleOutcome": "lorafleet.qa.rules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: the policy, rules, reports and triggers are torch-free; evaluation needs torch."""
    return lazy_export(__name__, _EXPORTS, name)
