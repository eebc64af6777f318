"""Fine-tuning on loom's own model: LoRA adapters (``lora.py``) and soft prompts (``prompt_tuning.py``) trained
by ``train.py``'s loop, saved in PEFT's format (LoRA: which ``loom --lora`` merges; both: which PEFT loads)."""

from loom.finetune.lora import LoraConfig, LoraLinear, LoraModel, attach_lora
from loom.finetune.prompt_tuning import (PromptTuningConfig, SoftPrompt, SoftPromptModel, attach_prompt_tuning,
                                         load_prompt_tuning, prompt_lm_loss)
from loom.finetune.train import TrainConfig, lm_loss, train

__all__ = ["LoraConfig", "LoraLinear", "LoraModel", "attach_lora", "PromptTuningConfig", "SoftPrompt",
           "SoftPromptModel", "attach_prompt_tuning", "load_prompt_tuning", "prompt_lm_loss", "TrainConfig",
           "lm_loss", "train"]
