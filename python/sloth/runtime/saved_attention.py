"""Causal attention whose results are kept by an offloaded checkpoint, so that its recompute skips the attention.

Under ``use_gradient_checkpointing="sloth"`` the backward pass recomputes each decoder layer before
backpropagating through it. The recompute needs the attention's output O (the o_proj input), and the attention
backward needs q, k, v, O and the softmax's log-sum-exp (LSE): all of them are what the forward computed. At long
sequences the attention forward is the costliest part of the recompute that does not scale with the weights
(about 1.2 ms per layer at 8192 tokens, 37 ms of a Llama-3.1-8B step), and the q / k / v and o projections'
products a fifth of the layer's weight FLOPs. So, on NVIDIA GPUs (sm_80 or later), for layers of at most
:data:`MAX_TOKENS` tokens, in their eager runs and in their CUDA-graph replays:

- forward (no grad, inside :class:`~sloth.runtime.offload_checkpoint.OffloadedCheckpointFunction`): inside
  :func:`collecting`, :func:`causal_attention` runs cuDNN's fused attention (the kernel SDPA picks on sm_90),
  asking it for the LSE as well, and hands a :class:`SavedAttention` to the checkpoint, which copies its tensors
  to pinned host memory with the layer's input (within a host-memory budget, see
  :mod:`sloth.runtime.offload_checkpoint`);
- backward: the checkpoint brings them back with the layer's input; inside :func:`replaying`, the recompute's
  attention returns the saved O under an autograd node whose backward is cuDNN's attention backward with the
  saved O and LSE (:class:`SavedAttentionFunction`: what SDPA's own backward computes, with the same kernel).
- layers replayed from CUDA graphs (:mod:`sloth.runtime.layer_graphs`, up to 4,096 tokens) do the same inside
  their graphs: the forward graph leaves the saved tensors in static buffers, copied out
  after each replay; the backward graph reads them back from those buffers.

:mod:`sloth.integrations.sdpa` routes Transformers' "sdpa" attention here and, for PEFT LoRA projections, also
saves q / k / v and the attention module's output, so that the recompute skips the q / k / v and o projections'
products as well.

Only plain causal self-attention takes this path: no mask tensor (a padded batch brings one), no dropout, no
softcapping or position bias, bf16 / fp16, equal q / k / v head dims of at most 256, query heads a multiple of
the key heads, cuDNN's SDPA kernels allowed (``torch.backends.cuda.enable_cudnn_sdp``) and no deterministic
algorithms asked for; anything else returns None and the caller runs the model's own attention. The path uses
torch's private ``aten::_scaled_dot_product_cudnn_attention`` (and its backward): if the installed torch rejects
it, one warning is logged, SDPA's own backward serves the attentions already saved, and nothing more is saved.
On by default; ``SLOTH_SAVE_ATTENTION=0`` (read at import) turns it off (its measured gain: benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import List, Optional

import torch

from .. import config

logger = logging.getLogger("sloth")

ENABLED = config.SAVE_ATTENTION
#: most tokens (hidden-state rows) of a layer whose attention is saved: beyond, the layers' inputs alone take tens of
#: GiB of host memory (409,600 tokens x 32 layers: 100 GiB), which saved attentions (up to 3.5x an input each)
#: must not crowd out
MAX_TOKENS = 65536
#: dtypes of the fused kernels (tests on the CPU add float32, with a plain-torch stand-in for the kernels)
DTYPES = (torch.bfloat16, torch.float16)
_TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2])
_capability: dict = {}  # CUDA device index -> major compute capability
_broken: List[str] = []  # the first failure of the private ops (the path is then off)
_local = threading.local()  # .collect: list receiving SavedAttention items (forward); .replay: list to consume


class SavedAttention:
    """One attention call's saved results: ``out [B, Hq, T, D]`` (memory laid out [B, T, Hq, D]), ``lse`` (fp32,
    per query row and head) and the opaque rest of the cuDNN forward's results its backward takes back; optionally
    the attention's inputs ``qkv`` (q, k, v as [B, H, T, D], after RoPE) and the attention module's output
    ``o_out [B, T, hidden]``, so that the recompute may skip the q / k / v and o projections too
    (:mod:`sloth.integrations.sdpa`)."""

    __slots__ = ("out", "lse", "aux", "scale", "qkv", "o_out", "inputs")

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, aux: tuple, scale: float,
                 qkv: Optional[List[torch.Tensor]] = None, o_out: Optional[torch.Tensor] = None):
        self.out, self.lse, self.aux, self.scale, self.qkv, self.o_out = out, lse, aux, scale, qkv, o_out
        self.inputs: Optional[List[torch.Tensor]] = None  # the forward's q, k, v: what qkv may be set to

    def tensors(self) -> List[torch.Tensor]:
        """The tensors to offload: O as [B, T, Hq, D], LSE, then q / k / v as [B, T, H, D] and o_out if kept."""
        out = [self.out.transpose(1, 2), self.lse]
        out += [x.transpose(1, 2) for x in self.qkv or ()]
        return out + ([self.o_out] if self.o_out is not None else [])

    def with_tensors(self, tensors: List[torch.Tensor]) -> "SavedAttention":
        """This item with its tensors replaced by ``tensors`` (as :meth:`tensors` gave them, e.g. copied back)."""
        return _assemble(tensors, self.aux, self.scale)

    def layout(self) -> tuple:
        """What a CUDA graph that saves or replays this item fixes (hashable): the shapes / dtypes of
        :meth:`tensors`, ``aux`` (its tensors' shapes / dtypes / devices, its other values) and the scale."""
        main = tuple((tuple(t.shape), t.dtype) for t in self.tensors())
        aux = tuple(("T", tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("C", a)
                    for a in self.aux)
        return main, aux, self.scale

    def flat(self) -> List[torch.Tensor]:
        """:meth:`tensors`, then the tensors of ``aux`` (what a graph's static buffers hold of this item)."""
        return self.tensors() + [a for a in self.aux if isinstance(a, torch.Tensor)]

    def drop(self) -> None:
        """Forget the GPU tensors (once their host copies are queued; :meth:`with_tensors` brings them back)."""
        self.out = self.lse = self.o_out = self.qkv = self.inputs = None

    def offloadable(self) -> bool:
        return self.out.transpose(1, 2).is_contiguous() and self.lse.is_contiguous()


def from_flat(layout: tuple, tensors: List[torch.Tensor]) -> SavedAttention:
    """The item of ``layout`` (:meth:`SavedAttention.layout`) whose :meth:`SavedAttention.flat` is ``tensors``."""
    main, aux, scale = layout
    rest = iter(tensors[len(main):])
    return _assemble(tensors[:len(main)], tuple(next(rest) if a[0] == "T" else a[1] for a in aux), scale)


def _assemble(tensors: List[torch.Tensor], aux: tuple, scale: float) -> SavedAttention:
    """An item from its :meth:`SavedAttention.tensors` (2, 3, 5 or 6 of them: q / k / v and the module output
    optional), ``aux`` and ``scale``."""
    has_qkv, has_o = {2: (False, False), 3: (False, True), 5: (True, False), 6: (True, True)}[len(tensors)]
    qkv = [x.transpose(1, 2) for x in tensors[2:5]] if has_qkv else None
    return SavedAttention(tensors[0].transpose(1, 2), tensors[1], aux, scale, qkv, tensors[-1] if has_o else None)


def enabled() -> bool:
    """Whether checkpoints may save attention outputs (on, and the private ops not found broken)."""
    return ENABLED and not _broken


@contextlib.contextmanager
def collecting(items: Optional[list]):
    """While active, :func:`causal_attention` of a no-grad forward appends its :class:`SavedAttention` to ``items``
    (None: nothing is collected)."""
    outer, _local.collect = getattr(_local, "collect", None), items
    try:
        yield
    finally:
        _local.collect = outer


@contextlib.contextmanager
def replaying(items: Optional[list]):
    """While active, :func:`causal_attention` in grad mode takes its output from the front of ``items``."""
    outer, _local.replay = getattr(_local, "replay", None), items
    try:
        yield
    finally:
        _local.replay = outer


def collected() -> Optional[list]:
    """The list a checkpoint's no-grad forward collects saved attentions into on this thread (None: none)."""
    return getattr(_local, "collect", None) if not torch.is_grad_enabled() else None


def next_replayed() -> Optional[SavedAttention]:
    """The saved attention the next replayed attention call will take (None: none)."""
    replay = getattr(_local, "replay", None)
    return replay[0] if replay and torch.is_grad_enabled() else None


def active() -> bool:
    """Whether a checkpoint is collecting or replaying saved attentions on this thread."""
    return getattr(_local, "collect", None) is not None or bool(getattr(_local, "replay", None))


def _supported(query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    if attention_mask is not None or not is_causal or dropout or kwargs.get("softcap") is not None or \
            kwargs.get("position_bias") is not None or kwargs.get("output_attentions"):
        return False
    if not (query.dim() == 4 and key.dim() == 4 and value.dim() == 4):
        return False
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    b, hq, t, d = query.shape
    return key.shape[0] == b and value.shape[0] == b and key.shape[2] == t and value.shape[2] == t and t > 1 and \
        key.shape[3] == d and value.shape[3] == d and d <= 256 and d % 8 == 0 and \
        key.shape[1] == value.shape[1] and hq % key.shape[1] == 0 and \
        query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1


def _fail(e: Exception) -> None:
    if not _broken:
        _broken.append(f"{type(e).__name__}: {e}")
        logger.warning("sloth: saving attention outputs in checkpoints is off: torch's cuDNN attention op "
                       "failed (%s); the recompute computes the attention as usual", _broken[0][:300])


def _rejected(e: Exception, t: torch.Tensor) -> bool:
    """Whether ``e`` from a private cuDNN op means the op rejects the call (the path then turns off), rather than
    out of memory or a failure of a CUDA graph capture in progress (the caller handles those: a failed capture
    runs that layer eagerly, and the path stays on)."""
    return not isinstance(e, torch.OutOfMemoryError) and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _cudnn_allowed() -> bool:
    """Whether the user lets SDPA use cuDNN's kernels (``torch.backends.cuda.enable_cudnn_sdp``) and does not ask
    for deterministic algorithms (cuDNN's attention backward is not)."""
    return torch.backends.cuda.cudnn_sdp_enabled() and not torch.are_deterministic_algorithms_enabled()


def _on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` is where the fused kernels run: an NVIDIA GPU of compute capability 8.0 or later (cuDNN's
    fused attention; measured on sm_90), not ROCm, with torch 2.6 or later (2.5.0's cuDNN attention could return
    NaN, pytorch#139298)."""
    if not t.is_cuda or getattr(torch.version, "hip", None) or _TORCH < (2, 6):
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    major = _capability.get(index)
    if major is None:
        major = _capability[index] = torch.cuda.get_device_capability(index)[0]
    return major >= 8


def _cudnn_forward(q, k, v, scale: float) -> tuple:
    """cuDNN's causal attention with its LSE: (out, lse, cum_seq_q, cum_seq_k, max_q, max_k, philox seed, offset,
    debug mask)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)


def _cudnn_backward(dout, q, k, v, out, lse, aux: tuple, scale: float) -> tuple:
    """cuDNN's causal attention backward: (dq, dk, dv); ``aux`` the forward's results after out and lse."""
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)


class SavedAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, saved)``: ``saved.out`` (the attention of q, k, v computed in the forward pass) as the
    output of a node whose backward is cuDNN's causal attention backward: reads q, k, v (``saved.qkv``'s values
    when it has them: the given q, k, v then only connect the graph), O, dO and the LSE, writes dq, dk, dv (summed
    over each key head's query group). Should that op reject the call, SDPA's own forward and backward run on the
    same q, k, v instead (and the path is off from then on)."""

    @staticmethod
    def forward(ctx, q, k, v, saved: SavedAttention):
        qkv = saved.qkv if saved.qkv is not None else (q, k, v)
        ctx.save_for_backward(*qkv, saved.out, saved.lse)
        ctx.aux, ctx.scale = saved.aux, saved.scale
        return saved.out.detach()

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride() != out.stride():
            dout = torch.empty_like(out).copy_(dout)  # same layout as O: empty_like keeps a dense tensor's strides
        try:
            dq, dk, dv = _cudnn_backward(dout, q, k, v, out, lse, ctx.aux, ctx.scale)
        except Exception as e:  # noqa: BLE001 - the private op rejected the call: SDPA's own backward (slower)
            if not _rejected(e, q):
                raise
            _fail(e)
            xs = [t.detach().requires_grad_() for t in (q, k, v)]
            with torch.enable_grad():
                o = torch.nn.functional.scaled_dot_product_attention(
                    *xs, is_causal=True, scale=ctx.scale, enable_gqa=q.shape[1] != k.shape[1])
                dq, dk, dv = torch.autograd.grad(o, xs, dout)
        if dk.shape[1] != k.shape[1]:  # per query head: sum each key head's group
            dk = dk.unflatten(1, (k.shape[1], -1)).sum(2)
            dv = dv.unflatten(1, (v.shape[1], -1)).sum(2)
        return dq, dk, dv, None


class ValueOf(torch.autograd.Function):
    """``apply(t, value)``: ``value``'s values under ``t``'s autograd history (the gradient goes to ``t``): a
    recompute's output whose computation was skipped takes the value the forward computed."""

    @staticmethod
    def forward(ctx, t, value):
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
                     scaling: Optional[float], is_causal: bool, kwargs: dict) -> Optional[torch.Tensor]:
    """The causal attention of ``query [B, Hq, T, D]``, ``key / value [B, Hk, T, D]`` as ``[B, T, Hq, D]``
    (contiguous, as Transformers' SDPA attention returns it) when a checkpoint collects or replays saved attentions
    and the call is supported (see the module docstring); None otherwise (the caller computes it)."""
    if not _on_device(query) or not _supported(query, key, value, attention_mask, dropout, is_causal, kwargs):
        return None
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    collect = collected()
    if collect is not None:
        if not enabled() or not _cudnn_allowed():
            return None
        try:
            r = _cudnn_forward(query, key, value, scale)
        except Exception as e:  # noqa: BLE001 - an op this torch does not have or rejects: off from now on
            if not _rejected(e, query):
                raise
            _fail(e)
            return None
        item = SavedAttention(r[0], r[1], (r[2], r[3], r[4], r[5], r[6], r[7]), scale)
        item.inputs = [query, key, value]
        if item.offloadable():
            collect.append(item)
        return item.out.transpose(1, 2).contiguous()
    item = next_replayed()  # (replayed even once the path is off: the recompute may have skipped q / k / v)
    if item is not None:
        if item.out.shape != query.shape or item.out.dtype != query.dtype or item.scale != scale:
            return None  # not the call that was saved: compute it
        _local.replay.pop(0)
        return SavedAttentionFunction.apply(query, key, value, item).transpose(1, 2).contiguous()
    return None
