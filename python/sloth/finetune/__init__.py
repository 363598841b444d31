"""`sloth finetune`: fine-tune a causal LM (by default a tiny bundled Llama on bundled instruction data) with
LoRA / QLoRA / full fine-tuning, built on :func:`sloth.from_pretrained`, :func:`sloth.get_peft_model` and TRL's
``SFTTrainer``. Heavy imports (transformers, peft, trl, datasets) are lazy."""

from .config import FinetuneConfig
from .errors import FinetuneError


def finetune(config: "FinetuneConfig"):
    """Run a fine-tune (see :func:`sloth.finetune.train.finetune`)."""
    from .train import finetune as _finetune

    return _finetune(config)


__all__ = ["FinetuneConfig", "FinetuneError", "finetune"]
