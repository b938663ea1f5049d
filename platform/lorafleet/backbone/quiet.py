"""Library noise: transformers' progress bars and info messages are not the business of services' logs."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Keep library noise out of services' logs and the demo's output: transformers' per-load progress bars
    and its info messages (bitsandbytes' import-time notice is silenced in ``lorafleet/__init__``)."""
    from transformers.utils import logging as hf_logging  # transformers, on first use

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
