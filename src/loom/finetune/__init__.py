"""Fine-tuning on loom's own model: LoRA adapters (``lora.py``) trained by ``train.py``'s loop, saved in
PEFT's format (which ``loom --lora`` merges and PEFT loads)."""

from loom.finetune.lora import LoraConfig, LoraLinear, LoraModel, attach_lora
from loom.finetune.train import TrainConfig, lm_loss, train

__all__ = ["LoraConfig", "LoraLinear", "LoraModel", "attach_lora", "TrainConfig", "lm_loss", "train"]
