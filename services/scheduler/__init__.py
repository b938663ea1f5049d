"""The continual-learning scheduler process: ``python -m services.scheduler [--once] [--interval S]``.

A thin wrapper: the policy and the tick live in ``lorafleet.jobs``.
"""
