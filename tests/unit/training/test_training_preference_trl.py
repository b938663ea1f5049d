"""Our DPO against TRL's ``DPOTrainer`` (PyPI ``trl``, a test-only dependency) on the real tiny backbone in fp32.

TRL trains a PEFT LoRA; given a ``PeftModel`` it keeps a copy of the adapter's initial weights as the reference
(adapter ``ref``), as lorafleet keeps the parent version. Both sides get the same LoRA weights (policy and
reference), the same token ids (ours: TRL's collator pads them its own way, on the right) and the same beta;
TRL's ``compute_loss`` gives its loss and logs the mean chosen and rejected rewards of the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from trl import DPOConfig, DPOTrainer

from lorafleet.adapters import SlotConfig, inject_bank
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, encode_example
from lorafleet.training.preference import dpo_terms, pair_logps, pair_sides
from lorafleet.training.trainer import SlotTraining, train_slots

TOL = 1e-4
BETA = 0.3
QV = ["q_proj", "v_proj"]
PAIRS = [
    Example(1, "Which colour is the sky?", "Blue.", "preference", "It is a shade I cannot name for you."),
    Example(2, "Say hello to the team", "Hello team, good morning!", "preference", "hi"),
    Example(3, "Sign off the note", "Thanks,\nAnna", "preference", "bye"),
]


def _trl_trainer(tiny_dir: Path, tokenizer: Any, out: Path) -> DPOTrainer:
    """DPOTrainer on a PEFT LoRA of the tiny base; the adapter moves away from its reference (``ref``) afterwards,
    as a policy does after some steps."""
    base = load_backbone(tiny_dir, quantization="fp32", device="cpu").model
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QV, init_lora_weights=False)
    model = get_peft_model(base, config)
    data = Dataset.from_dict(
        {
            "prompt": [p.prompt for p in PAIRS],
            "chosen": [p.completion for p in PAIRS],
            "rejected": [p.rejected for p in PAIRS],
        }
    )
    args = DPOConfig(
        output_dir=str(out),
        beta=BETA,
        loss_type=["sigmoid"],
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=len(PAIRS),
        max_length=None,
        save_strategy="no",
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert "ref" in trainer.model.peft_config  # TRL's reference: the adapter as it was given
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name and ".default." in name:
                param.add_(torch.randn_like(param) * 0.05)
    return trainer


def _trl_batch(trainer: DPOTrainer, tokenizer: Any, pairs: list[Example]) -> dict[str, torch.Tensor]:
    features = []
    for pair in pairs:
        (chosen, n_chosen), (rejected, n_rejected) = (
            encode_example(tokenizer, side, max_seq_len=128) for side in pair_sides(pair)
        )
        assert chosen[:-n_chosen] == rejected[:-n_rejected]
        features.append(
            {
                "prompt_ids": chosen[:-n_chosen],
                "chosen_ids": chosen[-n_chosen:],
                "rejected_ids": rejected[-n_rejected:],
            }
        )
    return trainer.data_collator(features)  # type: ignore[no-any-return]


def _trl_terms(trainer: DPOTrainer, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """TRL's loss and its logged mean chosen / rejected rewards for one batch."""
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    return float(loss), logged["rewards/chosen"][-1], logged["rewards/rejected"][-1]


def test_dpo_loss_and_implicit_rewards_equal_trl(
    tiny_dir: Path, fp32_backbone: Backbone, tmp_path: Path
) -> None:
    tokenizer = fp32_backbone.tokenizer
    trainer = _trl_trainer(tiny_dir, tokenizer, tmp_path / "trl")
    bank = inject_bank(fp32_backbone, target_modules=QV, n_slots=2, max_rank=4)
    slot_config = SlotConfig(rank=4, alpha=8)
    bank.load_slot(0, get_peft_model_state_dict(trainer.model, adapter_name="default"), slot_config)
    bank.load_slot(1, get_peft_model_state_dict(trainer.model, adapter_name="ref"), slot_config)
    policy = pair_logps(bank, tokenizer, PAIRS, [[(0, 1.0)]] * 3, max_seq_len=128)
    reference = pair_logps(bank, tokenizer, PAIRS, [[(1, 1.0)]] * 3, max_seq_len=128)
    ours = dpo_terms(*policy.T, *reference.T, beta=BETA)
    assert ours.margins.abs().min() > 1e-2  # the policy is not its reference: a check that can fail
    for i, pair in enumerate(PAIRS):  # one pair per batch: TRL's logged means are that pair's rewards
        loss, chosen, rejected = _trl_terms(trainer, _trl_batch(trainer, tokenizer, [pair]))
        assert float(ours.losses[i]) == pytest.approx(loss, abs=TOL)
        assert float(ours.chosen_rewards[i]) == pytest.approx(chosen, abs=TOL)
        assert float(ours.rejected_rewards[i]) == pytest.approx(rejected, abs=TOL)
    # the trainer's own step: the first batch holds all three pairs, its loss is TRL's loss of that batch
    loss, chosen, rejected = _trl_terms(trainer, _trl_batch(trainer, tokenizer, PAIRS))
    config = TrainingConfig(
        rank=4,
        alpha=8,
        dropout=0.0,
        max_steps=1,
        pairs_per_step=3,
        max_seq_len=128,
        dpo_weight=1.0,
        dpo_beta=BETA,
    )
    [result] = train_slots(bank, tokenizer, [SlotTraining(0, "u", PAIRS, (), reference_slot=1)], config)
    assert result.metrics["dpo_loss_first"] == pytest.approx(loss, abs=TOL)
    assert result.metrics["reward_margin"] == pytest.approx(chosen - rejected, abs=TOL)
    # DPO plus the SFT term on the chosen answers (``sft_on_chosen``) is TRL's loss_type ["sigmoid", "sft"]
    trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 1.0]
    with_sft, _, _ = _trl_terms(trainer, _trl_batch(trainer, tokenizer, PAIRS))
    assert with_sft > loss + 0.1  # the SFT term weighs something: a check that can fail
    policy_state = get_peft_model_state_dict(trainer.model, adapter_name="default")
    bank.load_slot(0, policy_state, slot_config, replace=True)  # the policy again, before the step above
    tasks = [SlotTraining(0, "u", PAIRS, (), reference_slot=1)]
    [result] = train_slots(bank, tokenizer, tasks, config.with_changes(sft_on_chosen=True))
    assert result.metrics["train_loss_first"] == pytest.approx(with_sft, abs=TOL)
