"""``BatchingOptions``: how a service's continuous batcher batches (the API process's, each Serve replica's).

Plain values (importing this needs no torch); ``ContinuousBatcher.from_options`` builds the batcher they describe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchingOptions:
    """The continuous batcher's options that a service sets (the API's ``ApiOptions`` and Ray Serve's
    ``ReplicaOptions`` extend it)."""

    #: rows decoding at once (continuous batching: requests join the running batch at the next step)
    max_batch_size: int = 16
    #: how long admission waits for more requests after the first of a group
    max_wait_ms: float = 5.0
    #: newcomers' prefill per decoding step, in padded prompt tokens (bounds the stall of running rows)
    max_prefill_tokens: int = 2048
    #: newcomers join a running batch once they are this fraction of its rows, or after this many steps; None:
    #: at every step where the backbone fuses joins into the step's forward (Llama), else 0.5
    join_ratio: float | None = None
    max_join_delay_steps: int = 4
