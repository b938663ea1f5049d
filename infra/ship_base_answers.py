"""Write ``platform/lorafleet/training/smollm2_base_answers.json``: the built-in backbone's greedy answers (nf4, CPU)
to the anchor prompts and to QA's default probe, which lorafleet ships so that no fresh process spends its first
job generating them (see :mod:`lorafleet.training.base_answers`).

Run it after changing ``ANCHOR_PROMPTS``, ``ANCHOR_MAX_NEW_TOKENS``, the probe's prompts or token budget, or the
conversion of ``builtin:smollm2-135m`` (a test fails until then)::

    .venv/bin/python infra/ship_base_answers.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import time

from lorafleet.backbone import build_smollm2_backbone, load_backbone
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.probe import PROBE_MAX_NEW_TOKENS, probe_prompts
from lorafleet.training.base_answers import SHIPPED_ANSWERS, answer_sets_json
from lorafleet.training.general_prompts import ANCHOR_MAX_NEW_TOKENS, ANCHOR_PROMPTS, generate_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default=None, help="where the converted backbone is (default: the settings')"
    )
    args = parser.parse_args()
    backbone = load_backbone(build_smollm2_backbone(args.data_dir), quantization="nf4", device="cpu")
    sets = []
    for prompts, budget in (
        (list(ANCHOR_PROMPTS), ANCHOR_MAX_NEW_TOKENS),
        (probe_prompts(QAPolicy().probe_size), PROBE_MAX_NEW_TOKENS),
    ):
        started = time.perf_counter()
        answers = generate_answers(
            backbone.model, backbone.tokenizer, prompts, budget
        )  # as anchor_examples does
        print(f"{len(prompts)} answers of up to {budget} tokens in {time.perf_counter() - started:.1f} s")
        sets.append((prompts, budget, answers))
    SHIPPED_ANSWERS.write_text(
        answer_sets_json(fingerprint=backbone.fingerprint.digest, quantization="nf4", sets=sets),
        encoding="utf-8",
    )
    print(f"wrote {SHIPPED_ANSWERS}")


if __name__ == "__main__":
    main()
