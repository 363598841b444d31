"""``sloth.from_pretrained``: load a checkpoint of a supported family (NF4 4-bit, 8-bit or 16-bit), its tokenizer,
and put sloth's kernels in the model."""

from __future__ import annotations

import logging
import warnings
from typing import Optional, Tuple

import torch

from .. import models
from ..runtime.distributed import local_cuda_index
from .precision import dtype_name, resolve_dtype

logger = logging.getLogger("sloth")

#: from_pretrained keyword arguments that also locate the config and the tokenizer
_HUB_KWARGS = ("token", "revision", "cache_dir", "trust_remote_code", "local_files_only", "force_download", "proxies")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _quantization(load_in_4bit: Optional[bool], load_in_8bit: bool, full_finetuning: bool) -> Optional[str]:
    """"4bit", "8bit" or None (16-bit) from the flags; conflicting flags are an error."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("sloth.from_pretrained: load_in_4bit and load_in_8bit are both True; pick one")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        which = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        raise ValueError(f"sloth.from_pretrained: full_finetuning=True trains every weight in 16/32-bit and cannot "
                         f"be combined with {which}=True; pass {which}=False (or full_finetuning=False for QLoRA)")
    if load_in_8bit:
        return "8bit"
    if load_in_4bit is None:  # the default: 4-bit unless full fine-tuning
        return None if full_finetuning else "4bit"
    return "4bit" if load_in_4bit else None


def _load_config(name_or_path: str, hub_kwargs: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    except Exception as e:  # a missing path, no network, a gated repo without token ...
        raise OSError(f"sloth.from_pretrained: cannot load the config of {name_or_path!r} ({_first_line(e)})") from None


def _check_family(config, name_or_path: str) -> None:
    model_type = getattr(config, "model_type", None)
    if models.for_model_type(model_type) is not None:
        return
    hint = models.unsupported_hint(model_type)
    raise ValueError(f"sloth.from_pretrained: {name_or_path!r} is a {model_type!r} model, which sloth does not "
                     f"support{f' ({hint})' if hint else ''}; supported families: {models.supported()}")


def _prequantized(config) -> Optional[dict]:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def _device_type(device_map) -> str:
    """Where the weights go: "cuda" when a CUDA GPU is visible and ``device_map`` does not say cpu, else "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    if isinstance(device_map, (str, torch.device)) and str(device_map).startswith("cpu"):
        return "cpu"
    if isinstance(device_map, dict) and device_map and all(str(v).startswith("cpu") for v in device_map.values()):
        return "cpu"
    return "cuda"


def _bnb_config(quant: str, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ImportError(f"sloth.from_pretrained: load_in_{quant}=True needs bitsandbytes (pip install "
                          f"bitsandbytes), or pass load_in_{quant}=False for a 16-bit model") from None
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _load_tokenizer(name_or_path: str, max_seq_length: int, hub_kwargs: dict):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
    except Exception as e:
        raise OSError(f"sloth.from_pretrained: cannot load the tokenizer of {name_or_path!r} ({_first_line(e)})") from None
    if tok.pad_token is None and (tok.eos_token is not None or tok.unk_token is not None):
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.model_max_length = max_seq_length
    return tok


def from_pretrained(name_or_path: str, max_seq_length: int = 2048, load_in_4bit: Optional[bool] = None,
                    load_in_8bit: bool = False, full_finetuning: bool = False, dtype=None,
                    **kwargs) -> Tuple[torch.nn.Module, object]:
    """Load a causal LM of a supported family (Llama, Qwen3, Mistral, Gemma 3 text) and its tokenizer, ready for
    :func:`sloth.get_peft_model` (QLoRA / LoRA) or full fine-tuning, with sloth's kernels in it
    (:func:`sloth.patch`). Returns ``(model, tokenizer)``.

    Args:
        name_or_path: a local directory or a Hugging Face hub id.
        max_seq_length: the longest sequence you will train on; sets ``tokenizer.model_max_length`` and
            ``model.max_seq_length`` (a warning when it exceeds the model's ``max_position_embeddings``; no RoPE
            scaling is applied).
        load_in_4bit: NF4 weights (bitsandbytes ``Linear4bit``, double-quantized absmax, blocksize 64) for QLoRA.
            Default (None): True, unless ``load_in_8bit`` or ``full_finetuning`` is set.
        load_in_8bit: bitsandbytes LLM.int8 weights.
        full_finetuning: every weight in 16 / 32 bit and trainable (cannot be combined with 4 / 8 bit). In fp16 the
            weights are kept in fp32 (train with autocast / ``fp16=True`` mixed precision).
        dtype: the compute dtype (``torch.bfloat16`` / ``torch.float16`` / ``torch.float32`` or a name). None: bf16 on
            GPUs that have it, fp16 on older ones, fp32 on the CPU. bf16 on a GPU without it is an error.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``token``, ``revision``, ``cache_dir``,
            ``trust_remote_code`` and ``local_files_only`` also to the config and tokenizer), e.g.
            ``attn_implementation``, ``device_map`` (default: the current CUDA device, cuda:LOCAL_RANK under
            torchrun, or the CPU).

    Errors (one line): an unsupported family (the message lists the supported ones), conflicting flags, bf16 asked
    on a GPU without it, bitsandbytes missing for 4 / 8 bit, a config or tokenizer that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    from ..integrations.transformers import patch, patched_modules

    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        raise ValueError(f"sloth.from_pretrained: max_seq_length must be a positive int, got {max_seq_length!r}")
    quant = _quantization(load_in_4bit, load_in_8bit, full_finetuning)
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = _load_config(name_or_path, hub_kwargs)
    _check_family(config, name_or_path)
    device_type = _device_type(kwargs.get("device_map"))
    compute_dtype = resolve_dtype(dtype, device_type)

    model_kwargs = dict(kwargs)
    if "quantization_config" in model_kwargs:
        raise ValueError("sloth.from_pretrained: pass load_in_4bit / load_in_8bit instead of quantization_config")
    pre = _prequantized(config)
    if pre is not None:
        is_bnb4 = pre.get("quant_method") == "bitsandbytes" and pre.get("load_in_4bit", False)
        if not (is_bnb4 and quant == "4bit"):
            kind = "a bitsandbytes 4-bit" if is_bnb4 else f"a {pre.get('quant_method', 'quantized')!r}"
            raise ValueError(f"sloth.from_pretrained: {name_or_path!r} is {kind} checkpoint; only bitsandbytes 4-bit "
                             f"checkpoints with load_in_4bit=True are supported pre-quantized; use the 16-bit "
                             f"checkpoint for the other modes")
    elif quant is not None:
        model_kwargs["quantization_config"] = _bnb_config(quant, compute_dtype)
    if device_type == "cuda" and "device_map" not in model_kwargs:
        model_kwargs["device_map"] = {"": local_cuda_index()}  # cuda:LOCAL_RANK under torchrun
    weight_dtype = torch.float32 if (full_finetuning and compute_dtype == torch.float16) else compute_dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=weight_dtype, **model_kwargs)
    tokenizer = _load_tokenizer(name_or_path, max_seq_length, hub_kwargs)

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        warnings.warn(f"sloth.from_pretrained: max_seq_length={max_seq_length} exceeds the model's "
                      f"max_position_embeddings={limit}; positions beyond it were not trained (no RoPE scaling is "
                      f"applied)", stacklevel=2)
    model.max_seq_length = max_seq_length
    if full_finetuning:
        model.requires_grad_(True)
    patch(model)
    logger.info("sloth.from_pretrained: %s (%s, %s, %s on %s); %d sloth replacements", name_or_path,
                models.for_config(config).name, quant or ("full fine-tuning" if full_finetuning else "16-bit"),
                dtype_name(compute_dtype), device_type, len(patched_modules(model)))
    return model, tokenizer
