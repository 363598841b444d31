"""`sloth finetune`: fine-tune a causal LM (by default a tiny bundled Llama on bundled instruction data) with
LoRA / QLoRA / full fine-tuning on sloth's kernels. Heavy imports (transformers, peft, datasets) are lazy."""

from .config import FinetuneConfig
from .errors import FinetuneError


def finetune(config: "FinetuneConfig"):
    """Run a fine-tune (see :func:`sloth.finetune.train.finetune`)."""
    from .train import finetune as _finetune

    return _finetune(config)


__all__ = ["FinetuneConfig", "FinetuneError", "finetune"]
