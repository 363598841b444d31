"""``sloth.FastLanguageModel``: the argument names of the most widely used fine-tuning accelerator's API, on
sloth, so that an existing notebook runs with its import changed (``from sloth import FastLanguageModel``).

Arguments that only tune that library's own machinery (vLLM fast inference settings, tokenizer fixing, ...) are
accepted and ignored with a one-line warning; those that would change the result and that sloth lacks (LoftQ,
vLLM fast inference, QAT) raise NotImplementedError.
"""

from __future__ import annotations

import warnings

from ..integrations.checkpointing import (pause_gradient_checkpointing, resume_gradient_checkpointing,
                                          set_gradient_checkpointing, transformers_model)
from .loading import from_pretrained as _from_pretrained
from .lora import DEFAULT_TARGETS
from .lora import get_peft_model as _get_peft_model

#: from_pretrained keywords passed on to Transformers
_PASS_THROUGH = ("revision", "cache_dir", "trust_remote_code", "local_files_only", "force_download", "proxies",
                 "attn_implementation", "device_map", "low_cpu_mem_usage", "subfolder")
#: LoraConfig fields get_peft_model passes on to PEFT
_LORA_FIELDS = ("layers_to_transform", "layers_pattern", "init_lora_weights")


def _ignore(where: str, names) -> None:
    if names:
        warnings.warn(f"sloth.FastLanguageModel.{where}: ignoring {', '.join(sorted(names))} (not used by sloth)",
                      stacklevel=3)


class FastLanguageModel:
    """Static methods ``from_pretrained``, ``get_peft_model``, ``for_inference`` and ``for_training`` taking the
    popular accelerator's argument names; each calls :func:`sloth.from_pretrained` / :func:`sloth.get_peft_model`."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True,
                        load_in_8bit: bool = False, load_in_16bit: bool = False, full_finetuning: bool = False,
                        token=None, use_gradient_checkpointing="sloth", fast_inference: bool = False, **kwargs):
        """``(model, tokenizer)`` as :func:`sloth.from_pretrained` loads them. Precedence of the flags as in the
        original API: ``full_finetuning``, ``load_in_16bit`` or ``load_in_8bit`` turn the default ``load_in_4bit``
        off (8-bit with 16-bit or full fine-tuning is an error). ``use_gradient_checkpointing`` (``"unsloth"`` reads
        as ``"sloth"``) applies here for full fine-tuning, else in :meth:`get_peft_model`. ``fast_inference=True``
        (vLLM) raises NotImplementedError; other unknown keywords are ignored with a warning."""
        if fast_inference:
            raise NotImplementedError("sloth.FastLanguageModel.from_pretrained: fast_inference=True (vLLM) is not "
                                      "supported; pass fast_inference=False and use model.generate")
        if load_in_8bit and (load_in_16bit or full_finetuning):
            raise ValueError("sloth.FastLanguageModel.from_pretrained: load_in_8bit=True cannot be combined with "
                             "load_in_16bit / full_finetuning; pick one")
        if full_finetuning or load_in_16bit or load_in_8bit:
            load_in_4bit = False
        passed = {k: kwargs.pop(k) for k in _PASS_THROUGH if k in kwargs}
        if passed.get("device_map") == "sequential":  # the original default: fill the GPUs in order
            passed.pop("device_map")
        _ignore("from_pretrained", kwargs)
        if token is not None:
            passed["token"] = token
        model, tokenizer = _from_pretrained(model_name, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit,
                                            load_in_8bit=load_in_8bit, full_finetuning=full_finetuning, dtype=dtype,
                                            **passed)
        if full_finetuning:
            set_gradient_checkpointing(model, use_gradient_checkpointing)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=DEFAULT_TARGETS, lora_alpha: float = 16,
                       lora_dropout: float = 0.0, bias: str = "none", use_gradient_checkpointing="sloth",
                       random_state: int = 3407, max_seq_length: int = 2048, use_rslora: bool = False,
                       modules_to_save=None, loftq_config=None, qat_scheme=None, **kwargs):
        """A PeftModel as :func:`sloth.get_peft_model` makes it; ``use_gradient_checkpointing="unsloth"`` reads as
        ``"sloth"``; ``layers_to_transform``, ``layers_pattern``, ``init_lora_weights`` go to ``peft.LoraConfig``;
        ``loftq_config`` (unless None / {}) and ``qat_scheme`` raise NotImplementedError; ``max_seq_length`` is
        recorded on the model; other unknown keywords are ignored with a warning."""
        if qat_scheme is not None:
            raise NotImplementedError("sloth.FastLanguageModel.get_peft_model: quantization-aware training "
                                      "(qat_scheme) is not supported; pass qat_scheme=None")
        lora_kwargs = {k: kwargs.pop(k) for k in _LORA_FIELDS if k in kwargs}
        _ignore("get_peft_model", kwargs)
        peft_model = _get_peft_model(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                     target_modules=list(target_modules) if isinstance(target_modules, tuple)
                                     else target_modules, bias=bias, use_rslora=use_rslora,
                                     use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                                     modules_to_save=modules_to_save,
                                     loftq_config=None if loftq_config == {} else loftq_config, **lora_kwargs)
        transformers_model(peft_model).max_seq_length = max_seq_length
        return peft_model

    @staticmethod
    def for_inference(model):
        """Eval mode, gradient checkpointing off, KV cache on (for ``model.generate``); returns ``model``."""
        model.eval()
        pause_gradient_checkpointing(model)
        transformers_model(model).config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        """Train mode, the gradient checkpointing chosen in :meth:`get_peft_model` back on (unless
        ``use_gradient_checkpointing=False``), KV cache off; returns ``model``."""
        model.train()
        if use_gradient_checkpointing:
            resume_gradient_checkpointing(model)
        else:
            pause_gradient_checkpointing(model)
        transformers_model(model).config.use_cache = False
        return model
