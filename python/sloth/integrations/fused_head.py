"""sloth's fused LM head for TRL trainers: per-token log-probs through
:func:`sloth.nn.linear_logprobs.linear_logprobs_stats` in place of TRL's ``add_fused_lm_head``.

How TRL 1.x computes log-probs: at construction each trainer calls ``trl.trainer.utils.add_fused_lm_head(model,
temperature, cast_lm_head_to_fp32, outputs)`` on the causal LM (the base model of a PeftModel), which replaces
the instance's ``forward``; the trainer then calls ``model(..., labels=labels, fused_lm_head=True)`` and reads
``log_probs`` / ``entropy`` / ``is_top1`` ... (zero where the label is -100) and ``loss`` (the summed NLL divided
by ``num_items_in_batch``, else by the number of labels) off a ``FusedCausalLMOutput``. The SFT loss, the DPO
policy and reference log-ratios and the GRPO policy / old / reference log-probs all come from that call.

sloth replaces that head with :func:`add_fused_lm_head` (same arguments, same outputs): the backbone runs as
usual (sloth-patched norms and LoRA layers), then only the positions whose label is not -100 go through
sloth's chunked log-prob kernel (one ``[chunk, vocab]`` logits buffer alive at a time, never ``[tokens, vocab]``).

Two ways in, both with the trainer used as TRL documents it:

- ``sloth.patch(peft_model)`` *before* building the trainer: when ``trl`` is imported, sloth hooks TRL's
  ``add_fused_lm_head`` (:func:`install`) so that a sloth-patched model gets sloth's head; other models keep TRL's,
  and so do MoE models (TRL's head adds the router's load-balancing loss) and models whose logits TRL rescales in
  ways sloth's head does not (see :func:`takes_over`).

:func:`sloth.integrations.trl.patch_trainer` puts a trainer already built on it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from ..nn.linear_logprobs import STATS, linear_logprobs_stats

IGNORE_INDEX = -100
#: what TRL's ``FusedCausalLMOutput`` carries per token
HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FUSED_ATTR = "_sloth_fused_head"  # on the causal LM: the FusedHead settings of sloth's head
_SCALING_ATTRS = ("output_multiplier", "lm_head_multiplier", "logits_scaling")  # logit scalings sloth leaves to TRL
_TRL_ADD = None  # TRL's own add_fused_lm_head, saved by install()


@dataclasses.dataclass
class FusedHead:
    """Settings of sloth's fused LM head on one model (the arguments of TRL's ``add_fused_lm_head``)."""

    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: Tuple[str, ...] = ("log_probs",)
    inner: Optional[Callable] = None  # the forward that non-fused calls go to
    had_own: bool = False  # whether the instance had its own `forward` before (restored by remove_fused_lm_head)
    old: Any = None


# ---------------------------------------------------------------------------------------------------- helpers



def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _head_scaling(model):
    """(softcap, logit_scale) of the model's logits as TRL reads them, or None if it uses a scaling sloth's head
    does not take over (the caller then keeps TRL's)."""
    cfg = _text_config(model)
    if any(getattr(cfg, a, None) is not None for a in _SCALING_ATTRS):
        return None
    return getattr(cfg, "final_logit_softcapping", None), getattr(cfg, "logit_scale", None)


def takes_over(model) -> bool:
    """Whether sloth's head computes what TRL's would for ``model``: dense models (MoE models keep TRL's head, which
    adds the router's load-balancing loss) without a logit scaling sloth does not apply."""
    cfg = _text_config(model)
    moe = any(getattr(cfg, a, None) for a in ("num_experts", "num_local_experts", "n_routed_experts"))
    return not moe and _head_scaling(model) is not None


def is_sloth_patched(model) -> bool:
    return "_sloth_orig_forward" in model.__dict__ or FUSED_ATTR in model.__dict__


def _fused_output(**fields):
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # older TRL: a ModelOutput with the same fields
        from transformers.modeling_outputs import ModelOutput

        out = ModelOutput()
        for k, v in fields.items():
            if v is not None:
                out[k] = v
        return out
    return FusedCausalLMOutput(**fields)


def head_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                  outputs: Sequence[str] = ("log_probs", "entropy"), cast_lm_head_to_fp32: bool = False) -> dict:
    """Per-token outputs of the LM head of ``model`` (a causal LM) for ``hidden [B, T, H]`` and next-token
    ``labels [B, T]`` (already shifted, -100 where not wanted): a dict of ``[B, T]`` tensors, zero where the label
    is -100, for each name in ``outputs`` (``log_probs`` always). Only the labelled positions go through sloth's
    chunked log-prob kernel; the logits are never materialized (a non-``nn.Linear`` head, e.g. one with a LoRA
    adapter, falls back to plain logits of the labelled positions)."""
    mask = labels != IGNORE_INDEX  # [B, T]
    h = hidden[mask]  # [n, H]
    tok = labels[mask]  # [n]
    head = model.get_output_embeddings()
    scaling = _head_scaling(model)
    if scaling is None:
        raise ValueError(f"sloth: {type(model).__name__} scales its logits with one of {_SCALING_ATTRS}, which sloth's "
                         "log-prob head does not apply; use TRL's own head for it")
    softcap, logit_scale = scaling
    stats = tuple(k for k in STATS if k in outputs)
    dev = h.device.type
    if type(head) is torch.nn.Linear:
        weight, bias = head.weight, head.bias
        # the GEMM in the head's own dtype, also under autocast: logits of fp32 weights are not rounded to bf16
        # (TRL's head keeps them in fp32 too); bf16 weights give bf16 logits (fp32 accumulation, one rounding)
        dtype = torch.float32 if cast_lm_head_to_fp32 else weight.dtype
        with torch.autocast(dev, enabled=False):
            res = linear_logprobs_stats(
                h.to(dtype), weight.to(dtype), tok.to(h.device), bias=None if bias is None else bias.to(dtype),
                temperature=temperature, softcap=softcap, logit_scale=logit_scale, stats=stats)
    else:  # e.g. a PEFT LoRA lm_head: the head's own forward on the labelled rows only
        z = head(h.float() if cast_lm_head_to_fp32 else h).float()  # [n, V]
        if logit_scale is not None:
            z = z * logit_scale
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        lp = torch.log_softmax(z, -1)
        res = {"log_probs": lp.gather(-1, tok[:, None]).squeeze(-1), "entropy": -(lp.exp() * lp).sum(-1)}
        with torch.no_grad():
            res.update(is_top1=z.argmax(-1) == tok, mean_logits=z.mean(-1),
                       log_sum_sq_probs=torch.logsumexp(2 * lp, -1))
    out = {}
    for k in HEAD_OUTPUTS:
        if k == "log_probs" or k in outputs:
            x = res[k]
            # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero)
            out[k] = x.new_zeros(mask.shape).masked_scatter(mask, x)
    return out


# ---------------------------------------------------------------------------------------------- fused LM head

def _fused_call(self, args, fused_lm_head, labels, shift_labels, num_items_in_batch, kwargs):
    st: FusedHead = self.__dict__[FUSED_ATTR]
    if not fused_lm_head:
        for k, v in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
            if v is not None:
                kwargs[k] = v
        return st.inner(*args, **kwargs)
    if labels is None and shift_labels is None:
        raise ValueError("sloth fused LM head: fused_lm_head=True needs labels (or shift_labels)")
    kwargs["use_cache"] = False
    kwargs.pop("return_dict", None)
    backbone = getattr(self, self.base_model_prefix)
    out = backbone(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = self.get_output_embeddings()
    hidden = hidden.to(head.weight.device)
    labels = labels.to(head.weight.device)
    per_token = head_logprobs(self, hidden, labels, temperature=st.temperature, outputs=st.outputs,
                              cast_lm_head_to_fp32=st.cast_lm_head_to_fp32)
    mask = labels != IGNORE_INDEX
    log_probs = per_token["log_probs"]
    divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / divisor
    return _fused_output(loss=loss, log_probs=log_probs, entropy=per_token.get("entropy"),
                         log_sum_sq_probs=per_token.get("log_sum_sq_probs"), mean_logits=per_token.get("mean_logits"),
                         is_top1=per_token.get("is_top1"), label_mask=mask, aux_loss=None)


def _make_forward(cls_forward):
    # keeps the class forward's signature (TRL does the same: `generate` validates its kwargs against it)
    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        return _fused_call(self, args, fused_lm_head, labels, shift_labels, num_items_in_batch, kwargs)

    return forward


def trl_head_settings(model) -> Optional[dict]:
    """The arguments TRL's ``add_fused_lm_head`` was called with on ``model`` (read off its closure), or None when
    the model's forward is not TRL's fused head."""
    fn = model.__dict__.get("forward")
    func = getattr(fn, "__func__", None)
    if func is None or func.__code__.co_name != "_fused_forward" or not func.__closure__:
        return None
    cells = dict(zip(func.__code__.co_freevars, func.__closure__))
    if "original_forward" not in cells:
        return None

    def get(name, default):
        try:
            return cells[name].cell_contents if name in cells else default
        except ValueError:  # empty cell
            return default

    return dict(temperature=get("temperature", 1.0), cast_lm_head_to_fp32=get("cast_lm_head_to_fp32", False),
                outputs=tuple(get("outputs", ("log_probs",))), original_forward=get("original_forward", None))


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: Sequence[str] = ("log_probs",)) -> None:
    """Give the causal LM ``model`` sloth's fused LM head: a drop-in for TRL's ``add_fused_lm_head`` with the same
    arguments. ``model(..., labels=labels, fused_lm_head=True)`` then returns TRL's ``FusedCausalLMOutput``
    (``loss``, per-token ``log_probs`` and the requested ``outputs``, zero where the label is -100, ``label_mask``)
    computed by sloth's chunked kernel; any other call runs the forward the model had. When ``model`` carries TRL's
    own head, it is replaced (non-fused calls then go to the forward TRL had wrapped). Calling it again updates
    the settings. Undo with :func:`remove_fused_lm_head`."""
    unknown = [k for k in outputs if k not in HEAD_OUTPUTS]
    if unknown:
        raise ValueError(f"sloth add_fused_lm_head: unknown output {unknown[0]!r}; expected some of {HEAD_OUTPUTS}")
    outputs = tuple(outputs)
    st = model.__dict__.get(FUSED_ATTR)
    if st is not None:
        st.temperature, st.cast_lm_head_to_fp32, st.outputs = float(temperature), bool(cast_lm_head_to_fp32), outputs
        return
    had_own = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    trl = trl_head_settings(model)
    inner = trl["original_forward"] if trl is not None and trl["original_forward"] is not None else model.forward
    model.__dict__[FUSED_ATTR] = FusedHead(float(temperature), bool(cast_lm_head_to_fp32), outputs, inner, had_own, old)
    model.forward = types.MethodType(_make_forward(type(model).forward), model)


def remove_fused_lm_head(model) -> Optional[FusedHead]:
    """Remove sloth's fused LM head from ``model`` (restoring the forward it had); returns its settings, or None
    when it had none."""
    st = model.__dict__.pop(FUSED_ATTR, None)
    if st is None:
        return None
    if st.had_own:
        model.forward = st.old
    else:
        model.__dict__.pop("forward", None)
    return st


def _hooked_add_fused_lm_head(model, *args, **kwargs):
    """What TRL's trainers call once :func:`install` ran: sloth's head on sloth-patched models, TRL's on others."""
    if is_sloth_patched(model) and takes_over(model):
        return add_fused_lm_head(model, *args, **kwargs)
    return _TRL_ADD(model, *args, **kwargs)


def install() -> bool:
    """Hook TRL's ``add_fused_lm_head`` (in ``trl.trainer.utils`` and every loaded TRL module that imported it) so
    that trainers built from now on give sloth-patched models sloth's fused LM head. Idempotent; called by
    :func:`sloth.patch` when ``trl`` is imported. Returns False when TRL has no fused head (older TRL)."""
    global _TRL_ADD
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    current = getattr(trl_utils, "add_fused_lm_head", None)
    if current is None:
        return False
    if _TRL_ADD is None:
        _TRL_ADD = current if current is not _hooked_add_fused_lm_head else None
    if _TRL_ADD is None:
        return False
    for name, mod in list(sys.modules.items()):
        if (name == "trl" or name.startswith("trl.")) and mod is not None and \
                getattr(mod, "add_fused_lm_head", None) is _TRL_ADD:
            setattr(mod, "add_fused_lm_head", _hooked_add_fused_lm_head)
    return True


def uninstall() -> None:
    """Undo :func:`install` (trainers built afterwards use TRL's own fused head again)."""
    if _TRL_ADD is None:
        return
    for name, mod in list(sys.modules.items()):
        if (name == "trl" or name.startswith("trl.")) and mod is not None and \
                getattr(mod, "add_fused_lm_head", None) is _hooked_add_fused_lm_head:
            setattr(mod, "add_fused_lm_head", _TRL_ADD)


def reattach_trl_head(model, st: Optional[FusedHead]) -> None:
    """Give ``model`` TRL's own fused head with the settings of a removed sloth head (so that a trainer keeps
    working after :func:`sloth.unpatch`)."""
    if st is None:
        return
    add = _TRL_ADD
    if add is None:
        try:
            from trl.trainer.utils import add_fused_lm_head as add
        except ImportError:
            return
    add(model, temperature=st.temperature, cast_lm_head_to_fp32=st.cast_lm_head_to_fp32, outputs=st.outputs)


__all__ = ["FusedHead", "add_fused_lm_head", "head_logprobs", "install", "reattach_trl_head", "remove_fused_lm_head",
           "takes_over", "uninstall"]
