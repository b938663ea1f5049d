"""Gates over a user's adapter bank: which adapters (and with what weights) serve each request.

- ``resolve_user_bank(db, tenant_id=..., user_external_id=...) -> UserBank``: the live versions of the user's
  own adapters plus the task adapters they are enrolled in, the gate spec, and a ``revision`` (``bank``)
- ``enrol`` / ``unenrol`` / ``list_enrolments`` / ``enrolment_history``, ``set_gate_spec`` (``bank``)
- ``GateSpec``, ``GateDecision`` (``spec``); ``build_gate``, ``CentroidGate``, ``LearnedGate``, ``FixedGate``,
  ``plan_from_decisions`` (``gates``)
- ``pooled_embeddings``, ``embed_prompts``, ``routing_key`` (``embeddings``)
- ``train_learned_gate``, ``register_learned_gate``, ``load_learned_gate`` (``learned``)

Importing this package does not import torch; the names above are loaded on first use, and ``bank`` and
``spec`` never need it.

Its room (docs/architecture.md): the ML layer, above ``adapters`` and below serving, training and QA: which
adapters of a user's bank answer a request, and how the bank is resolved from the registry. Re-checking QA
after an enrolment is a workflow (``lorafleet.workflows.qa_triggers``).
"""

from __future__ import annotations

from typing import Any

from lorafleet._exports import lazy_export

_EXPORTS = {
    "BankMember": "lorafleet.routing.bank",
    "UserBank": "lorafleet.routing.bank",
    "Enrolment": "lorafleet.routing.bank",
    "EnrolmentEvent": "lorafleet.routing.bank",
    "resolve_user_bank": "lorafleet.routing.bank",
    "enrol": "lorafleet.routing.bank",
    "unenrol": "lorafleet.routing.bank",
    "list_enrolments": "lorafleet.routing.bank",
    "enrolment_history": "lorafleet.routing.bank",
    "set_gate_spec": "lorafleet.routing.bank",
    "clear_gate_spec": "lorafleet.routing.bank",
    "GateSpec": "lorafleet.routing.spec",
    "GateDecision": "lorafleet.routing.spec",
    "Gate": "lorafleet.routing.gates",
    "CentroidGate": "lorafleet.routing.gates",
    "FixedGate": "lorafleet.routing.gates",
    "LearnedGate": "lorafleet.routing.gates",
    "build_gate": "lorafleet.routing.gates",
    "plan_from_decisions": "lorafleet.routing.gates",
    "pooled_embeddings": "lorafleet.routing.embeddings",
    "embed_prompts": "lorafleet.routing.embeddings",
    "routing_key": "lorafleet.routing.embeddings",
    "GateTrainingConfig": "lorafleet.routing.learned",
    "LearnedGateModel": "lorafleet.routing.learned",
    "train_learned_gate": "lorafleet.routing.learned",
    "register_learned_gate": "lorafleet.routing.learned",
    "load_learned_gate": "lorafleet.routing.learned",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: the bank and the spec are torch-free; gates, embeddings and learned gates need torch."""
    return lazy_export(__name__, _EXPORTS, name)
