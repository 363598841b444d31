"""``sloth.get_peft_model``: LoRA adapters on a (4-bit, 8-bit or 16-bit) model, running on sloth's kernels, with
gradient checkpointing (offloaded by default)."""

from __future__ import annotations

import logging

import torch

from .. import models
from ..integrations.checkpointing import normalize_mode, set_gradient_checkpointing

logger = logging.getLogger("sloth")

#: the linear projections LoRA goes on by default (attention and MLP of Llama / Qwen3 / Mistral / Gemma 3)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LINEAR_CLASSES = ("Linear", "Linear4bit", "Linear8bitLt")


def _linear_names(model) -> set:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ in _LINEAR_CLASSES}


def _default_targets(model) -> list:
    present = _linear_names(model)
    targets = [t for t in DEFAULT_TARGETS if t in present]
    if not targets:
        raise ValueError(f"sloth.get_peft_model: the model has none of the default LoRA targets "
                         f"({', '.join(DEFAULT_TARGETS)}); pass target_modules")
    return targets


#: the 3-D parameters of a fused experts module that LoRA goes on by default (PEFT ``target_parameters``)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def _default_expert_parameters(model) -> list:
    """``["mlp.experts.gate_up_proj", ...]``: the expert stacks of an MoE family's model, as PEFT's
    ``target_parameters`` names them (the last two module names and the parameter)."""
    classes = models.experts()
    out = []
    for name, m in model.named_modules():
        if type(m).__name__ in classes:
            owner = ".".join(name.split(".")[-2:])
            out += [f"{owner}.{p}" for p in EXPERT_PARAMETERS if isinstance(getattr(m, p, None), torch.nn.Parameter)]
    return sorted(set(out))


def _check_args(r, lora_alpha, lora_dropout, bias, loftq_config) -> None:
    if loftq_config is not None and loftq_config != {}:
        raise NotImplementedError("sloth.get_peft_model: LoftQ initialization (loftq_config) is not supported; "
                                  "pass loftq_config=None")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"sloth.get_peft_model: r must be a positive int, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"sloth.get_peft_model: lora_alpha must be a positive number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"sloth.get_peft_model: lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"sloth.get_peft_model: bias must be \"none\", \"all\" or \"lora_only\", got {bias!r}")


def get_peft_model(model, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0, target_modules=None,
                   bias: str = "none", use_rslora: bool = False, use_gradient_checkpointing="sloth",
                   random_state: int = 3407, modules_to_save=None, loftq_config=None, **lora_config_kwargs):
    """Add LoRA adapters to ``model`` (from :func:`sloth.from_pretrained`, or any Transformers model of a supported
    family) and return the PEFT ``PeftModel``, its LoRA layers, norms and loss on sloth's kernels.

    The base model is frozen (only the LoRA matrices and ``modules_to_save`` train); norms and other 16-bit weights
    stay in their dtype (no fp32 upcast, unlike PEFT's ``prepare_model_for_kbit_training``); the LoRA matrices are
    fp32 (PEFT's default).

    Args:
        r, lora_alpha, lora_dropout, bias, use_rslora, modules_to_save: as in ``peft.LoraConfig`` (scaling
            ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
        target_modules: module names to put LoRA on; None: every linear projection of attention and MLP
            (q, k, v, o, gate, up, down) and, in MoE families (gpt-oss, Qwen3-MoE), the experts' stacked
            ``gate_up_proj`` / ``down_proj`` as PEFT ``target_parameters`` (logged). ``"all-linear"`` and regexes
            work as in PEFT.
        use_gradient_checkpointing: ``"sloth"`` (each decoder layer keeps only its input, offloaded to pinned host
            memory on CUDA, see :mod:`sloth.runtime.offload_checkpoint`), True (Transformers' checkpointing) or False.
            With checkpointing the embeddings' output requires grad and the KV cache is off.
        random_state: seed of the LoRA initialization (the global RNG state is left as it was).
        loftq_config: not supported (NotImplementedError unless None).
        **lora_config_kwargs: more ``peft.LoraConfig`` fields (``layers_to_transform``, ``init_lora_weights``, ...).
    """
    _check_args(r, lora_alpha, lora_dropout, bias, loftq_config)
    mode = normalize_mode(use_gradient_checkpointing)
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as peft_get_peft_model

    from ..integrations.transformers import patch, unpatch

    if isinstance(model, PeftModel):
        raise ValueError("sloth.get_peft_model: the model already has LoRA adapters (it is a PeftModel); call "
                         "get_peft_model once on the base model")
    targets = _default_targets(model) if target_modules is None else target_modules
    if target_modules is None and "target_parameters" not in lora_config_kwargs:
        experts = _default_expert_parameters(model)
        if experts:
            lora_config_kwargs["target_parameters"] = experts
            logger.info("sloth.get_peft_model: LoRA on %s and on the experts' %s (PEFT target_parameters)",
                        ", ".join(targets), ", ".join(experts))
    unpatch(model)  # re-patched below as a whole, PEFT layers included
    model.requires_grad_(False)
    set_gradient_checkpointing(model, mode)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias=bias,
                        use_rslora=use_rslora, modules_to_save=modules_to_save, task_type="CAUSAL_LM",
                        **lora_config_kwargs)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(random_state)
        if devices:
            torch.cuda.manual_seed(random_state)  # the current device only, restored by fork_rng
        peft_model = peft_get_peft_model(model, config)
    return patch(peft_model)
