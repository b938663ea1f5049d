"""QA: every adapter version is evaluated in the combinations it is served in before it reaches users.

Public API (names load on first use, so importing this package does not import torch):

- ``QAPolicy``: thresholds, budgets and seeds, versioned in every report (``policy``)
- ``load_report``, ``format_report``, ``reports_for_version`` (``reports``); ``QAReport`` rows
- ``probe_examples`` (``probe``), ``check_adapter`` (``sanity``), ``Matrix`` (``results``), the rules (``rules``)

Its room (docs/architecture.md): the top of the ML layer: evaluation, rules, policy and reports over backbone,
adapters, routing, serving and training. The ``qa`` job handler and the triggers that queue QA jobs are
workflows (``lorafleet.workflows.qa_runner``, ``lorafleet.workflows.qa_triggers``).
"""

from __future__ import annotations

from lorafleet._exports import lazy_export

# The policy, rules, reports and triggers are torch-free; evaluation needs torch.
__getattr__, __dir__, __all__ = lazy_export(
    __name__,
    {
        "lorafleet.qa.policy": ("QAPolicy",),
        "lorafleet.qa.reports": ("load_report", "format_report", "reports_for_version"),
        "lorafleet.store.sql.qa_repository": ("QAReport",),
        "lorafleet.qa.probe": ("probe_examples",),
        "lorafleet.qa.sanity": ("check_adapter",),
        "lorafleet.qa.results": ("Matrix",),
        "lorafleet.qa.rules": ("RuleOutcome",),
    },
)
