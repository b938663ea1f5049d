"""Workflows: the multi-step operations that tie the store, the registry and the ML layer together.

This is where a change to "what happens when ..." goes. Each module here is one workflow, run by a job
handler, an API route, the CLI or the demo: ``continual`` (the ``train`` job handler: feedback to a new
version), ``qa_runner`` (the ``qa`` job handler) and ``qa_triggers`` (when QA jobs are queued),
``adapter_import`` and ``import_jobs`` (PEFT imports as task-adapter versions), ``tasks`` (shared task
adapters: feedback, listing, live moves) and ``live_alias`` (moving a ``live`` alias, and the QA that
must follow it). Workflows sit above the ML layer (backbone, adapters, training math, gates) and below the
runtime (Ray actors, Ray Serve, the scheduler loop) and the entry points; they import nothing from either.
"""
