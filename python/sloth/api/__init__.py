"""The model-level API: ``sloth.from_pretrained``, ``sloth.get_peft_model`` and the ``sloth.FastLanguageModel``
compatibility shim. Transformers / PEFT are imported lazily (only when a function runs)."""

from .fast_language_model import FastLanguageModel, FastModel, is_bfloat16_supported
from .loading import from_pretrained
from .lora import get_peft_model

__all__ = ["FastLanguageModel", "FastModel", "from_pretrained", "get_peft_model", "is_bfloat16_supported"]
