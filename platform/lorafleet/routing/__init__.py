"""Gates over a user's experts: which adapters (and with what weights) serve each request.

- ``resolve_user_experts(db, tenant_id=..., user_external_id=...) -> ExpertSet``: the live versions of the user's
  own adapters plus the task adapters they are enrolled in, the gate spec, and a ``revision`` (``bank``)
- ``enrol`` / ``unenrol`` / ``list_enrolments`` / ``enrolment_history``, ``set_gate_spec`` (``bank``)
- ``GateSpec``, ``GateDecision`` (``spec``); ``build_gate``, ``CentroidGate``, ``LearnedGate``, ``FixedGate``,
  ``plan_from_decisions`` (``gates``)
- ``pooled_embeddings``, ``embed_prompts``, ``routing_key`` (``embeddings``)
- ``train_learned_gate``, ``register_learned_gate``, ``load_learned_gate`` (``learned``)

Importing this package does not import torch; the names above are loaded on first use, and ``bank`` and
``spec`` never need it.

Its room (docs/architecture.md): the ML layer, above ``adapters`` and below serving, training and QA: which
adapters of a user's experts answer a request, and how the bank is resolved from the registry. Re-checking QA
after an enrolment is a workflow (``lorafleet.workflows.qa_triggers``).
"""

from __future__ import annotations

from lorafleet._exports import lazy_export

# The bank and the spec are torch-free; gates, embeddings and learned gates need torch.
__getattr__, __dir__, __all__ = lazy_export(
    __name__,
    {
        "lorafleet.routing.experts": (
            "Expert",
            "ExpertSet",
            "Enrolment",
            "EnrolmentEvent",
            "resolve_user_experts",
            "enrol",
            "unenrol",
            "list_enrolments",
            "enrolment_history",
            "set_gate_spec",
            "clear_gate_spec",
        ),
        "lorafleet.routing.spec": ("GateSpec", "GateDecision"),
        "lorafleet.routing.gates": (
            "Gate",
            "CentroidGate",
            "FixedGate",
            "LearnedGate",
            "build_gate",
            "plan_from_decisions",
        ),
        "lorafleet.routing.embeddings": ("pooled_embeddings", "embed_prompts", "routing_key"),
        "lorafleet.routing.learned": (
            "GateTrainingConfig",
            "LearnedGateModel",
            "train_learned_gate",
            "register_learned_gate",
            "load_learned_gate",
        ),
    },
)
