"""TRL on sloth: the per-token log-probs of ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer`` (and every other TRL
trainer built on TRL's fused LM head) through :func:`sloth.nn.linear_logprobs.linear_logprobs_stats`, plus
response-only label masking and a stand-alone per-token log-prob function for RL code.

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
- :func:`patch_trainer` on a trainer already built (e.g. one that wrapped the model with ``peft_config=``):
  sloth-patches its model and swaps TRL's head of the model and of a separate ``ref_model`` for sloth's, with the
  temperature / outputs TRL chose.

The reference log-probs of DPO / GRPO with a PEFT model come from the same weights with the adapter disabled
(TRL's ``use_adapter(model, None)`` = PEFT's ``disable_adapter()``; TRL keeps ``ref_model=None``): no second model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import types
import warnings
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from ..nn.linear_logprobs import STATS, linear_logprobs_stats
from ._models import peft_parts

IGNORE_INDEX = -100
#: what TRL's ``FusedCausalLMOutput`` carries per token
HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_FUSED = "_sloth_fused_head"  # on the causal LM: the FusedHead settings of sloth's head
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


def _is_sloth_patched(model) -> bool:
    return "_sloth_orig_forward" in model.__dict__ or _FUSED in model.__dict__


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
    st: FusedHead = self.__dict__[_FUSED]
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


def _trl_head_settings(model) -> Optional[dict]:
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
    st = model.__dict__.get(_FUSED)
    if st is not None:
        st.temperature, st.cast_lm_head_to_fp32, st.outputs = float(temperature), bool(cast_lm_head_to_fp32), outputs
        return
    had_own = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    trl = _trl_head_settings(model)
    inner = trl["original_forward"] if trl is not None and trl["original_forward"] is not None else model.forward
    model.__dict__[_FUSED] = FusedHead(float(temperature), bool(cast_lm_head_to_fp32), outputs, inner, had_own, old)
    model.forward = types.MethodType(_make_forward(type(model).forward), model)


def remove_fused_lm_head(model) -> Optional[FusedHead]:
    """Remove sloth's fused LM head from ``model`` (restoring the forward it had); returns its settings, or None
    when it had none."""
    st = model.__dict__.pop(_FUSED, None)
    if st is None:
        return None
    if st.had_own:
        model.forward = st.old
    else:
        model.__dict__.pop("forward", None)
    return st


def _hooked_add_fused_lm_head(model, *args, **kwargs):
    """What TRL's trainers call once :func:`install` ran: sloth's head on sloth-patched models, TRL's on others."""
    if _is_sloth_patched(model) and takes_over(model):
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


def _lm_of(model):
    """The causal LM inside a (possibly accelerate-wrapped) PeftModel / Transformers model."""
    model = getattr(model, "module", model)  # DDP
    lm, _ = peft_parts(model)
    return lm


def patch_trainer(trainer):
    """Put a built TRL trainer on sloth: :func:`sloth.patch` its model (norms, loss, LoRA layers) and replace TRL's
    fused LM head of the model and of a separate ``ref_model`` by sloth's (:func:`add_fused_lm_head`, with the
    temperature and outputs TRL chose). Also :func:`install`s the hook for trainers built later. Returns the
    trainer. Idempotent."""
    from .transformers import patch

    install()
    models = [trainer.model]
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        models.append(ref)
    for m in models:
        lm = _lm_of(m)
        trl = _trl_head_settings(lm)
        if trl is not None and takes_over(lm):
            add_fused_lm_head(lm, trl["temperature"], trl["cast_lm_head_to_fp32"], trl["outputs"])
        elif trl is None and _FUSED not in lm.__dict__ and not _is_sloth_patched(lm):
            warnings.warn(f"sloth.integrations.trl.patch_trainer: {type(trainer).__name__}'s model has no TRL fused "
                          "LM head (TRL < 1.0?); only sloth.patch is applied", stacklevel=2)
        patch(getattr(m, "module", m))
    return trainer


# ------------------------------------------------------------------------------------- stand-alone log-probs

def selective_logprobs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                       logits_to_keep: Optional[int] = None, completion_mask: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, reference: bool = False, return_entropy: bool = False,
                       position_ids: Optional[torch.Tensor] = None):
    """Per-token log-probabilities of ``input_ids [B, T]`` under ``model`` (a causal LM or a PeftModel), each token
    scored from the position before it, through sloth's chunked kernel (no ``[tokens, vocab]`` logits).

    Returns fp32 ``[B, T - 1]`` (token t+1 given the tokens up to t), or ``[B, logits_to_keep]`` for the last
    ``logits_to_keep`` tokens (GRPO's completions), and with ``return_entropy`` the entropies too. Positions where
    ``attention_mask`` (of the scored token) or ``completion_mask [B, logits_to_keep or T - 1]`` is 0 give 0.
    ``reference=True`` scores with the PEFT adapter disabled (the reference model of DPO / GRPO from the same
    weights). Differentiable when grad is enabled. Matches TRL's ``selective_log_softmax`` of the logits divided
    by ``temperature``.
    """
    lm, peft_model = peft_parts(model)
    if reference and peft_model is None:
        raise ValueError("sloth.integrations.trl.selective_logprobs: reference=True needs a PeftModel (the reference "
                         "is the base model with the adapter disabled); score a separate reference model directly")
    ctx = peft_model.disable_adapter() if reference else contextlib.nullcontext()
    with ctx:
        out = getattr(lm, lm.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # [B, T-1, H]
    targets = input_ids[:, 1:]  # [B, T-1]
    keep = torch.ones_like(targets, dtype=torch.bool)
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].bool()
    if logits_to_keep:
        hidden, targets, keep = hidden[:, -logits_to_keep:], targets[:, -logits_to_keep:], keep[:, -logits_to_keep:]
    if completion_mask is not None:
        if completion_mask.shape != targets.shape:
            raise ValueError(f"sloth.integrations.trl.selective_logprobs: completion_mask has shape "
                             f"{tuple(completion_mask.shape)}, expected {tuple(targets.shape)}")
        keep &= completion_mask.bool()
    labels = targets.masked_fill(~keep, IGNORE_INDEX)
    res = head_logprobs(lm, hidden, labels, temperature=temperature, outputs=("log_probs", "entropy"))
    return (res["log_probs"], res["entropy"]) if return_entropy else res["log_probs"]


# ---------------------------------------------------------------------------------- response-only training

def _part_ids(tokenizer, part) -> List[List[int]]:
    """Token-id spellings of a template part: encoded alone, and as it is encoded after a newline / a space
    (BPE merges across the boundary can change its first token)."""
    if isinstance(part, (list, tuple)) and all(isinstance(x, int) for x in part):
        return [list(part)]
    if not isinstance(part, str) or not part:
        raise ValueError(f"sloth.train_on_responses_only: a template part must be a non-empty string, got {part!r}")
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = [enc(part)]
    for prefix in ("\n", " ", "\n\n"):
        p, full = enc(prefix), enc(prefix + part)
        if full[: len(p)] == p and full[len(p):] and full[len(p):] not in out:
            out.append(full[len(p):])
    return [ids for ids in out if ids]


def response_mask(ids: Sequence[int], instruction_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                  starts: Iterable[int] = ()) -> List[bool]:
    """For one row of token ids: True on the tokens of assistant responses, i.e. after a response part and up to
    (not including) the next instruction part or the start of the next packed example (``starts``); the parts
    themselves are False."""
    ids = list(ids)
    starts = set(starts)
    n = len(ids)
    keep = [False] * n
    inside = False
    i = 0

    def match(at, seqs):
        for s in seqs:
            if ids[at: at + len(s)] == list(s):
                return len(s)
        return 0

    while i < n:
        if i in starts:
            inside = False
        m = match(i, response_ids)
        if m:
            inside = True
            i += m
            continue
        m = match(i, instruction_ids)
        if m:
            inside = False
            i += m
            continue
        keep[i] = inside
        i += 1
    return keep


class ResponseOnlyCollator:
    """Wraps a data collator: after it builds a batch, labels outside the assistant responses become -100 (see
    :func:`train_on_responses_only`). Rows of a padding-free batch are split at ``position_ids == 0``."""

    def __init__(self, collator, instruction_ids, response_ids):
        self.collator, self.instruction_ids, self.response_ids = collator, instruction_ids, response_ids

    def __getattr__(self, name):  # TRL reads attributes of its collator (padding_free, ...)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples, *args, **kwargs):
        batch = self.collator(examples, *args, **kwargs)
        ids = batch["input_ids"]
        labels = batch.get("labels")
        labels = ids.clone() if labels is None else labels.clone()
        pos = batch.get("position_ids")
        for r in range(ids.shape[0]):
            starts = (pos[r] == 0).nonzero().flatten().tolist() if pos is not None else ()
            keep = torch.tensor(response_mask(ids[r].tolist(), self.instruction_ids, self.response_ids, starts),
                                dtype=torch.bool)
            labels[r][~keep] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


def train_on_responses_only(trainer_or_collator, instruction_part, response_part, *, tokenizer=None):
    """Train only on the assistant responses: labels become -100 everywhere except on the tokens after each
    ``response_part`` (e.g. ``"<|start_header_id|>assistant<|end_header_id|>\\n\\n"`` for Llama 3) up to the next
    ``instruction_part`` (e.g. ``"<|start_header_id|>user<|end_header_id|>\\n\\n"``); the assistant's end-of-turn
    token stays trained, the parts themselves do not. Works on padded and padding-free / packed batches.

    ``trainer_or_collator``: a Transformers / TRL trainer (its ``data_collator`` is wrapped in place and the trainer
    returned) or a data collator (a wrapped collator is returned). ``tokenizer`` defaults to the trainer's
    ``processing_class``. The parts may also be given as lists of token ids.
    """
    is_trainer = hasattr(trainer_or_collator, "data_collator") and hasattr(trainer_or_collator, "train")
    collator = trainer_or_collator.data_collator if is_trainer else trainer_or_collator
    if tokenizer is None and is_trainer:
        tokenizer = getattr(trainer_or_collator, "processing_class", None) or getattr(trainer_or_collator,
                                                                                    "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    if tokenizer is None and not all(isinstance(p, (list, tuple)) for p in (instruction_part, response_part)):
        raise ValueError("sloth.train_on_responses_only: pass tokenizer= (or the parts as token-id lists)")
    if collator is None or not callable(collator):
        raise ValueError("sloth.train_on_responses_only: the trainer has no data collator to wrap")
    if isinstance(collator, ResponseOnlyCollator):
        collator = collator.collator
    wrapped = ResponseOnlyCollator(collator, _part_ids(tokenizer, instruction_part),
                                   _part_ids(tokenizer, response_part))
    if is_trainer:
        trainer_or_collator.data_collator = wrapped
        return trainer_or_collator
    return wrapped


__all__ = [
    "FusedHead",
    "ResponseOnlyCollator",
    "add_fused_lm_head",
    "head_logprobs",
    "install",
    "patch_trainer",
    "remove_fused_lm_head",
    "response_mask",
    "selective_logprobs",
    "takes_over",
    "train_on_responses_only",
    "uninstall",
]
