"""RoPE of the supported families on sloth's in-place kernel (:func:`sloth.rope`).

Transformers has no registry for rotary embeddings: each family's attention calls its modeling module's
``apply_rotary_pos_emb(q, k, cos, sin)``. sloth puts a dispatcher in that module's namespace once (it calls the
original function unless told otherwise) and wraps the ``forward`` of each patched attention instance so that,
for the duration of that call only, the dispatcher rotates q and k in place with sloth's kernel (fp32 math, one
rounding; cos / sin as the model's rotary embedding computed them, so every scaling - default, llama3, linear,
dynamic - is covered); under torch.compile it rotates into new tensors instead (a traced graph must not write into
views of its intermediates). Unpatched models in the same process keep the original function: the switch is a context
variable, per thread. Anything unusual (a layout whose q / k are not views of a [tokens, heads, head_dim]
buffer, partial rotary, another unsqueeze_dim, a device without the op) runs the original function.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import weakref

import torch

from ..runtime import saved_attention
from ..nn.norm_rope import RopeFunction, RopeOutFunction
from .qkv import qkv_group

_active = contextvars.ContextVar("sloth_rope_active", default=False)
#: the same switch while torch.compile traces (a one-element list: Dynamo traces its reads and writes)
_compiled_active = [False]
_ORIGINAL = "_sloth_original"  # attribute of the dispatcher: the module's own apply_rotary_pos_emb
#: .entry: (weakref cos, weakref sin, cos._version, sin._version, fp32 cos, fp32 sin, memo for _pieces)
_fp32_cache = threading.local()


def _fp32_cos_sin(cos: torch.Tensor, sin: torch.Tensor):
    """(cos fp32, sin fp32, memo) for ``cos / sin [B or 1, T, D]``, made once per rotary embedding output.

    A model computes ``position_embeddings`` once per forward and hands the same two tensors to every decoder
    layer (and, under checkpointing, to every layer's recompute): the fp32 copies (the kernel reads fp32; exact
    for bf16 / fp16) and the [B * T, D] layouts derived from them (``memo``, see :func:`_pieces`) are made by the
    first layer and reused by the others while cos / sin are the same, unmodified tensors. Not cached when cos /
    sin require grad (the copies would belong to another graph), for inference-mode tensors (no version counter),
    under torch.compile tracing or while a CUDA graph is captured (the copies would hold values only once the
    graph is replayed)."""
    if cos.requires_grad or sin.requires_grad or cos.is_inference() or sin.is_inference() or \
            torch.compiler.is_compiling() or (cos.is_cuda and torch.cuda.is_current_stream_capturing()):
        return cos.float(), sin.float(), {}
    e = getattr(_fp32_cache, "entry", None)
    if e is not None and e[0]() is cos and e[1]() is sin and e[2] == cos._version and e[3] == sin._version:
        return e[4], e[5], e[6]
    c, s, memo = cos.float(), sin.float(), {}
    _fp32_cache.entry = (weakref.ref(cos), weakref.ref(sin), cos._version, sin._version, c, s, memo)
    return c, s, memo


def _pieces(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, memo: dict):
    """``x [B, heads, T, D]`` and ``cos / sin [B or 1, T, D]`` as a list of ``(x3 [tokens, heads', D] view of x,
    cos2 [tokens, D], sin2)`` that cover x, or None for a layout the kernel cannot address. ``memo`` keeps the
    [B * T, D] cos / sin made for q, so that k (and the other layers, see :func:`_fp32_cos_sin`) reuse them
    instead of copying them again."""
    b, t = x.shape[0], x.shape[2]
    if x.stride(-1) != 1:
        return None
    bthd = x.transpose(1, 2)  # [B, T, heads, D]
    if bthd.is_contiguous():  # q / k straight from the projection: tokens = B * T
        key = ("flat", b)
        if key not in memo:  # a copy when cos / sin are [1, T, D] broadcast over B > 1, else views
            c = cos.expand(b, -1, -1) if cos.shape[0] != b else cos
            s = sin.expand(b, -1, -1) if sin.shape[0] != b else sin
            memo[key] = (c.reshape(b * t, -1), s.reshape(b * t, -1))  # [B * T, D] each
        c2, s2 = memo[key]
        return [(bthd.reshape(b * t, x.shape[1], x.shape[3]), c2, s2)]
    if cos.shape[0] == 1 and x.is_contiguous():  # [B, heads, T, D] (normed after the transpose, Gemma 3)
        return [(x.permute(2, 0, 1, 3).view(t, b * x.shape[1], x.shape[3]), cos[0], sin[0])]
    return [(x[i].transpose(0, 1), cos[i if cos.shape[0] == b else 0], sin[i if sin.shape[0] == b else 0])
            for i in range(b)]  # [T, heads, D] views with strides (D, T * D, 1) or any other per-row layout


def _sloth_rotary(q, k, cos, sin):
    """(q, k) rotated in place by sloth's kernel, or None when not applicable (the caller runs the original)."""
    if q.dim() != 4 or k.dim() != 4 or q.dtype != k.dtype or q.device.type not in ("cpu", "cuda"):
        return None
    b, t = q.shape[0], q.shape[2]
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1:] != (t, q.shape[-1]) or cos.shape[0] not in (1, b):
        return None
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != q.shape[3]:
        return None
    if torch.compiler.is_compiling():
        return _rotary_functional(q, k, cos, sin)
    cos, sin, memo = _fp32_cos_sin(cos, sin)  # once for q and k, and for every layer of this forward
    pieces = [_pieces(q, cos, sin, memo), _pieces(k, cos, sin, memo)]
    if pieces[0] is None or pieces[1] is None:
        return None
    for x3, c2, s2 in pieces[0] + pieces[1]:
        RopeFunction.apply(x3, c2, s2)  # in place on a view of q / k: q and k see the rotation
    return q, k


def _rotary_functional(q, k, cos, sin):
    """(q, k) rotated into new tensors (under torch.compile: a traced graph must see no in-place write into a
    view; the in-place form gave wrong gradients compiled). q / k [B, heads, T, D] of any layout, cos / sin
    [B or 1, T, D]; the results are [B, T, heads, D]-contiguous seen as [B, heads, T, D] (the projections' layout)."""
    b, t = q.shape[0], q.shape[2]
    c = cos.float().expand(b, -1, -1).reshape(b * t, -1)  # [B * T, D]
    s = sin.float().expand(b, -1, -1).reshape(b * t, -1)
    out = []
    for x in (q, k):
        x3 = x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3])  # [B * T, heads, D] (a view when it can be)
        out.append(RopeOutFunction.apply(x3, c, s).view(b, t, x.shape[1], x.shape[3]).transpose(1, 2))
    return out[0], out[1]


def _dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        active = _compiled_active[0] if torch.compiler.is_compiling() else _active.get()
        if active and not args and set(kwargs) <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1:
            out = _sloth_rotary(q, k, cos, sin)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _ORIGINAL, original)
    apply_rotary_pos_emb.__doc__ = (original.__doc__ or "") + "\n(sloth: in-place kernel inside patched attention)"
    return apply_rotary_pos_emb


def install_dispatcher(attention: torch.nn.Module) -> bool:
    """Put the dispatcher into the modeling module of ``attention``'s class (once); False if it has no
    ``apply_rotary_pos_emb``."""
    mod = sys.modules.get(type(attention).__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        return False
    if not hasattr(fn, _ORIGINAL):
        mod.apply_rotary_pos_emb = _dispatcher(fn)
    return True


def sloth_attention_forward(self, *args, **kwargs):
    """The attention's own forward, with the RoPE dispatcher switched to sloth's kernel during the call and its
    q, k, v LoRA projections grouped (sloth.integrations.qkv); under an offloaded checkpoint that saves
    attentions, :func:`sloth.integrations.sdpa.checkpointed_attention_forward`."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace a ContextVar (each use was a graph break): a plain flag it can, and the q, k, v
        # grouping (a run-time cache of eager calls) is left to the compiler
        prev, _compiled_active[0] = _compiled_active[0], True
        try:
            return self._sloth_orig_forward(*args, **kwargs)
        finally:
            _compiled_active[0] = prev
    token = _active.set(True)
    try:
        if saved_attention.active():
            from .sdpa import checkpointed_attention_forward  # (import cycle: sdpa uses qkv / peft)

            return checkpointed_attention_forward(self, args, kwargs)
        with qkv_group(self):
            return self._sloth_orig_forward(*args, **kwargs)
    finally:
        _active.reset(token)
