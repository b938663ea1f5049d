"""What several benchmarks share: the backbone sizes they compare, interleaved timing with per-run ratios, and
access to the tests' shared helpers.

The benchmarks run as scripts (``.venv/bin/python tests/benchmarks/bench_x.py``), so this folder is on
``sys.path`` and they import this module as ``_common``; importing it also puts the repository root on
``sys.path``, so that ``tests.*`` helpers (``tests.databases``, ``tests.lora_weights``) import as they do under
pytest. Import it before any ``tests.*`` module.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

#: ``--backbone`` for the random-init backbones of ``--configs`` (sizes of ``BACKBONE_SIZES``)
TINY_BACKBONE = "tiny"
#: "medium" is big enough that matmuls dominate a CPU forward; "tiny" is the built-in offline backbone
BACKBONE_SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "medium": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}


def timed(
    conditions: dict[str, Callable[[], Any]], runs: int, *, warmup_each: bool
) -> dict[str, list[float]]:
    """Wall seconds of each run per condition, runs interleaved across conditions so that machine noise hits
    them alike.

    With ``warmup_each``, each timed call follows an untimed call of the same condition, so no condition pays
    for the allocator and cache state that the previous (differently shaped) condition left behind; without
    it, each condition is called once, untimed, before the first round.
    """
    samples: dict[str, list[float]] = {name: [] for name in conditions}
    if not warmup_each:
        for fn in conditions.values():
            fn()
    for _ in range(runs):
        for name, fn in conditions.items():
            if warmup_each:
                fn()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def word_prompts(tokenizer: Any, n: int, tokens: int, rng: Any) -> list[str]:
    """``n`` raw prompts of random lowercase words from ``rng`` (a numpy ``Generator``), each word added until the
    prompt has at least ``tokens`` tokens under ``tokenizer``."""
    prompts = []
    for _ in range(n):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 8)))))
        prompts.append(" ".join(words))
    return prompts


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-run ratios (``numerator / denominator`` of seconds: > 1 means the denominator is faster);
    runs of one round share the machine's load, so pairs cancel most noise."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def add_int_options(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """An integer option for each keyword, in order: ``--name-with-dashes``, the keyword's value its default."""
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)


def add_backbone_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that run either tiny random-init backbones or one real backbone:
    ``--backbone``, ``--configs``, ``--data-dir`` and ``--threads``."""
    parser.add_argument(
        "--backbone",
        default=TINY_BACKBONE,
        help="'tiny' (the default): the random-init backbones of --configs; or a built-in name such as "
        "builtin:smollm2-135m (or a checkpoint folder), run with the smaller sizes of SMOLLM2_SIZES",
    )
    parser.add_argument("--configs", default="tiny,medium", help="tiny backbones to run (--backbone tiny)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".lorafleet"), help="where backbones are built or converted"
    )
    parser.add_argument("--threads", type=int, default=2)


def chosen_sizes(
    args: argparse.Namespace, tiny_sizes: dict[str, Any], real_sizes: dict[str, Any]
) -> dict[str, Any]:
    """The sizes for the chosen backbone (``tiny_sizes`` or ``real_sizes``), each one given as a flag instead
    of its default."""
    sizes = dict(tiny_sizes if args.backbone == TINY_BACKBONE else real_sizes)
    sizes.update({k: v for k, v in vars(args).items() if k in sizes and v is not None})
    return sizes


def backbones_to_run(args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    """Name and folder of each backbone to run: the tiny ones of ``--configs`` (built into ``--data-dir``), or
    the one real ``--backbone`` (converted there once)."""
    # imported here: it loads torch, which the benchmarks that only time or make databases do not need
    from lorafleet.backbone import build_tiny_backbone, resolve_backbone_path

    if args.backbone != TINY_BACKBONE:
        yield args.backbone, resolve_backbone_path(args.backbone, data_dir=args.data_dir)
        return
    for name in args.configs.split(","):
        yield name, build_tiny_backbone(args.data_dir, **BACKBONE_SIZES[name])
