"""``sloth.FastLanguageModel`` / ``sloth.FastModel``: the argument names of the most widely used fine-tuning
accelerator's API, on sloth, so that an existing notebook runs with its import changed (``from sloth import
FastLanguageModel``): loading (a checkpoint, or a saved LoRA adapter folder with its base model), LoRA, the
inference / training switches, and the saving methods on the model (``save_pretrained_merged``,
``save_pretrained_gguf``, ``push_to_hub_merged``, ``push_to_hub_gguf``, see :mod:`sloth.export.hub`). Loading
also lets TRL's ``SFTTrainer`` / ``SFTConfig`` take their pre-1.0 argument names (``tokenizer=``,
``dataset_text_field=``, ``max_seq_length=``, ...), as those notebooks pass them.

Arguments that only tune that library's own machinery (vLLM fast inference settings, tokenizer fixing, ...) are
accepted and ignored with a one-line warning; those that would change the result and that sloth lacks (fp8
loading, LoftQ, vLLM fast inference, QAT) raise NotImplementedError.
"""

from __future__ import annotations

import json
import os
import warnings

from ..integrations.checkpointing import (pause_gradient_checkpointing, resume_gradient_checkpointing,
                                          set_gradient_checkpointing, transformers_model)
from .loading import from_pretrained as _from_pretrained
from .lora import DEFAULT_TARGETS
from .lora import get_peft_model as _get_peft_model
from ..export.hub import attach

#: from_pretrained keywords passed on to Transformers
_PASS_THROUGH = ("revision", "cache_dir", "trust_remote_code", "local_files_only", "force_download", "proxies",
                 "attn_implementation", "device_map", "low_cpu_mem_usage", "subfolder")
#: LoraConfig fields get_peft_model passes on to PEFT
_LORA_FIELDS = ("layers_to_transform", "layers_pattern", "init_lora_weights")


def is_bfloat16_supported() -> bool:
    """Whether bf16 training works here: the current CUDA GPU's bf16 support, and True on the CPU (PyTorch's CPU
    autocast runs bf16), so that ``bf16=is_bfloat16_supported()`` / ``fp16=not is_bfloat16_supported()`` pick a
    mode that runs."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return True


def _compat_trl() -> None:
    """When TRL is installed: its trainers give sloth-patched models sloth's fused LM head, and SFTTrainer /
    SFTConfig take the pre-1.0 argument names notebooks pass."""
    try:
        from ..integrations.fused_head import install
    except ImportError:  # an older layout
        from ..integrations.trl import install
    from ..integrations.trl import install_pre_1_0_names

    if install_pre_1_0_names():
        install()


def _adapter_base(path: str):
    """(base model name or path, PEFT config dict) when ``path`` is a saved LoRA adapter folder, else None."""
    cfg = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else None
    if cfg is None or not os.path.isfile(cfg):
        return None
    with open(cfg, encoding="utf-8") as f:
        data = json.load(f)
    base = data.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"sloth.FastLanguageModel.from_pretrained: {path!r} is a LoRA adapter without "
                         f"base_model_name_or_path in adapter_config.json; load the base model and use "
                         f"peft.PeftModel.from_pretrained")
    return base, data


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
        as ``"sloth"``) applies here for full fine-tuning and for a saved adapter, else in :meth:`get_peft_model`.

        ``model_name`` may be a folder written by ``model.save_pretrained`` of a LoRA model (``adapter_config.json``):
        its base model is loaded with the same flags and the adapter put on it, trainable, with the folder's
        tokenizer when it has one. The model gets ``save_pretrained_merged``, ``save_pretrained_gguf``,
        ``push_to_hub_merged`` and ``push_to_hub_gguf``. ``fast_inference=True`` (vLLM) and ``load_in_fp8`` raise
        NotImplementedError; other unknown keywords are ignored with a warning."""
        if fast_inference:
            raise NotImplementedError("sloth.FastLanguageModel.from_pretrained: fast_inference=True (vLLM) is not "
                                      "supported; pass fast_inference=False and use model.generate")
        if kwargs.pop("load_in_fp8", False):
            raise NotImplementedError("sloth.FastLanguageModel.from_pretrained: fp8 loading (load_in_fp8) is not "
                                      "supported; use load_in_4bit=True (QLoRA) or load_in_16bit=True")
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
        _compat_trl()
        adapter = _adapter_base(model_name) if isinstance(model_name, (str, os.PathLike)) else None
        base_name = adapter[0] if adapter else model_name
        model, tokenizer = _from_pretrained(base_name, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit,
                                            load_in_8bit=load_in_8bit, full_finetuning=full_finetuning, dtype=dtype,
                                            **passed)
        if adapter:
            model, tokenizer = _load_adapter(model, tokenizer, os.fspath(model_name), max_seq_length,
                                             use_gradient_checkpointing)
        elif full_finetuning:
            set_gradient_checkpointing(model, use_gradient_checkpointing)
        return attach(model), tokenizer

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
        _compat_trl()
        return attach(peft_model)

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


def _load_adapter(model, tokenizer, path: str, max_seq_length: int, use_gradient_checkpointing):
    """The LoRA adapter saved in ``path`` on ``model`` (its base, already loaded), trainable and on sloth's kernels,
    with the folder's tokenizer when it has one."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..integrations.transformers import patch, unpatch

    unpatch(model)  # re-patched below as a whole, PEFT layers included
    model.requires_grad_(False)
    peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
    set_gradient_checkpointing(peft_model, use_gradient_checkpointing)
    transformers_model(peft_model).max_seq_length = max_seq_length
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.model_max_length = max_seq_length
    return patch(peft_model), tokenizer


class FastModel(FastLanguageModel):
    """``FastModel``: the same loader, LoRA and switches as :class:`FastLanguageModel` for the text models sloth
    supports (the original's vision / audio models are not)."""
