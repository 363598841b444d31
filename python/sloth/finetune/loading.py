"""Load the tokenizer and the model of a run and make it trainable: LoRA, QLoRA (NF4 base) or full."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .config import LORA_TARGETS
from .errors import FinetuneError
from .tokenizer import CHAT_TEMPLATE


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: the contents of a file when it names one, else the literal Jinja string."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise FinetuneError(f"--chat-template {value!r} is neither a file nor a Jinja template string")


def load_tokenizer(model: str, chat_template: Optional[str]):
    """The tokenizer of ``model`` with a pad token (eos when it has none) and a chat template (``chat_template``,
    else its own, else sloth's)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise FinetuneError(f"could not load a tokenizer for --model {model!r} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); pass a local "
                            f"model directory or a hub id that is in the local cache") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def check_causal_lm(path: str) -> None:
    """Raise FinetuneError unless ``path`` (a directory or hub id) holds the config of a causal-LM family."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise FinetuneError(f"could not load the config of --model {path!r} ({type(e).__name__}); pass a local "
                            f"model directory or a hub id that is in the local cache") from None
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FinetuneError(f"--model {path!r} is a {cfg.model_type!r} model, which is not a causal language model "
                            f"family (AutoModelForCausalLM cannot load it); pick a decoder-only LM")


def load_model(path: str, method: str, dtype: torch.dtype, device: torch.device):
    """The causal LM at ``path`` on ``device``: weights in ``dtype`` (fp32 master weights for full fine-tuning in
    fp16), NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(path)
    kwargs = {}
    if method == "qlora":
        if device.type != "cuda":
            raise FinetuneError("--method qlora needs a CUDA GPU; use --method lora on the CPU")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise FinetuneError("--method qlora needs bitsandbytes; pip install bitsandbytes (or use --method lora)") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    weight_dtype = torch.float32 if (method == "full" and dtype == torch.float16) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weight_dtype, **kwargs)
    except Exception as e:
        raise FinetuneError(f"could not load --model {path!r} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    if method != "qlora":
        model.to(device)
    model.config.use_cache = False
    return model


def make_trainable(model, method: str, r: int, lora_alpha: float, lora_dropout: float):
    """Wrap ``model`` for ``method``: a PEFT LoRA model (q, k, v, o, gate, up, down; the base frozen) whose LoRA
    layers run on sloth's fused op, or the model itself with every weight trainable (full)."""
    if method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    from ..integrations.peft import patch_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or
             type(m).__name__ == "Linear4bit"}
    targets = [t for t in LORA_TARGETS if t in names]
    if not targets:
        raise FinetuneError("the model has none of the LoRA target modules (q/k/v/o/gate/up/down_proj); "
                            "use --method full")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    patch_peft_model(peft_model)
    return peft_model
