"""The adapter bank layer: many LoRA adapters on one frozen base layer, PEFT-format read/write."""
