"""Mixture-of-experts ops (``torch.ops.sloth.moe_*``): routing, permute, grouped GEMM over dense / NF4 / MXFP4
expert stacks with bias, LoRA and GLU epilogues, combine, and their backward pieces.

Semantics and conventions: :mod:`sloth.reference.moe`. An expert stack is stored ``[E, A, B]``;
``trans=False`` computes ``x W[e]^T`` (out = A, in = B: Transformers' Qwen3-MoE layout, and the MXFP4 /
NF4 layout of every quantized stack), ``trans=True`` ``x W[e]`` (out = B, in = A: gpt-oss's bf16 layout, and
every backward dX).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_tensor

GLU_KINDS = {"none": 0, "swiglu": 1, "swiglu_interleaved": 2, "gptoss": 3, "gptoss_concat": 4}
ROUTE_KINDS = {"softmax_topk": 0, "topk_softmax": 1}
_FMT = {"dense": 0, "nf4": 1, "mxfp4": 2}


@dataclass
class MoEWeight:
    """An expert stack stored ``[E, A, B]`` (``shape``) in one of three formats.

    * ``dense``: ``data`` is the float tensor itself (either of its last two dims contiguous).
    * ``nf4``: ``data`` packed uint8 (the flattened stack in bitsandbytes' layout), ``scale`` the absmax (fp32
      ``[E * A * B / blocksize]``, or uint8 with ``code2`` / ``absmax2`` / ``offset`` ``[]`` or ``[E]``).
    * ``mxfp4``: ``data`` blocks uint8 ``[E, A, B / 32, 16]``, ``scale`` E8M0 scales ``[E, A, B / 32]``
      (gpt-oss checkpoints' ``*_blocks`` / ``*_scales``).
    """

    fmt: str
    data: torch.Tensor
    shape: tuple
    scale: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    blocksize: int = 64
    blocksize2: int = 256

    @staticmethod
    def dense(w: torch.Tensor) -> "MoEWeight":
        return MoEWeight("dense", w, tuple(w.shape))

    @staticmethod
    def mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> "MoEWeight":
        """From gpt-oss ``*_blocks [E, A, B / 32, 16]`` / ``*_scales [E, A, B / 32]``."""
        E, A, G, _ = blocks.shape
        return MoEWeight("mxfp4", blocks, (E, A, G * 32), scale=scales)

    @staticmethod
    def quantize_mxfp4(w: torch.Tensor) -> "MoEWeight":
        """MXFP4 of a float stack ``[E, A, B]`` (B % 32 == 0), quantized along B."""
        from .mxfp4 import mxfp4_quantize

        blocks, scales = mxfp4_quantize(w.contiguous())
        return MoEWeight.mxfp4(blocks, scales)

    @staticmethod
    def quantize_nf4(w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True) -> "MoEWeight":
        """NF4 of a float stack ``[E, A, B]``, one quantization per expert (its own absmax statistics and
        double-quantization offset and absmax2 blocks), concatenated; needs A * B % blocksize == 0."""
        from .nf4 import nf4_quantize

        E, A, B = w.shape
        if (A * B) % blocksize:
            raise ValueError(f"sloth: NF4 expert quantization needs A * B ({A * B}) divisible by blocksize {blocksize}")
        parts = [nf4_quantize(w[e], blocksize, compress_statistics) for e in range(E)]
        data = torch.cat([p.reshape(-1) for p, _ in parts])
        st = [s for _, s in parts]
        scale = torch.cat([s.absmax for s in st])
        if not compress_statistics:
            return MoEWeight("nf4", data, (E, A, B), scale=scale, blocksize=blocksize)
        return MoEWeight("nf4", data, (E, A, B), scale=scale, code2=st[0].state2.code,
                         absmax2=torch.cat([s.state2.absmax for s in st]),
                         offset=torch.stack([s.offset.reshape(()) for s in st]), blocksize=blocksize,
                         blocksize2=st[0].state2.blocksize)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight and its scales."""
        ts = [self.data, self.scale, self.absmax2, self.offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def dequantize(self, dtype=torch.bfloat16) -> torch.Tensor:
        """The ``[E, A, B]`` stack in ``dtype`` (for baselines and tests; the GEMM never builds it)."""
        from ..reference.moe import dequantize_weight

        return dequantize_weight(self.fmt, self.data, self.shape, dtype, absmax=self.scale, scales=self.scale,
                                 code2=self.code2, absmax2=self.absmax2, offset=self.offset,
                                 blocksize=self.blocksize, blocksize2=self.blocksize2)

    def to(self, device) -> "MoEWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, data=mv(self.data), scale=mv(self.scale), code2=mv(self.code2),
                       absmax2=mv(self.absmax2), offset=mv(self.offset))


def _glu_code(glu) -> int:
    if isinstance(glu, str):
        if glu not in GLU_KINDS:
            raise ValueError(f"sloth: unknown MoE GLU kind {glu!r}; use one of {sorted(GLU_KINDS)}")
        return GLU_KINDS[glu]
    if glu not in range(5):
        raise ValueError(f"sloth: MoE GLU kind must be 0-4 or one of {sorted(GLU_KINDS)}, got {glu}")
    return int(glu)


def moe_route(logits: torch.Tensor, top_k: int, kind="softmax_topk", renormalize: bool = False):
    """``(weights [T, k] fp32, ids [T, k] int64)`` of router logits ``[T, E]``: ``softmax_topk`` (Qwen3-MoE:
    softmax, top-k, optional renormalization) or ``topk_softmax`` (gpt-oss: top-k of the logits, softmax over
    them). Ties go to the lower expert index."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, dim=2)
    k = ROUTE_KINDS.get(kind, kind)
    if k not in (0, 1):
        raise ValueError(f"sloth: routing kind must be one of {sorted(ROUTE_KINDS)}, got {kind!r}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"sloth: top_k must be in [1, {logits.shape[1]}] (the number of experts), got {top_k}")
    check_device_supported(logits, "moe_route")
    return torch.ops.sloth.moe_route(logits, int(top_k), int(k), bool(renormalize))


def moe_permute(ids: torch.Tensor, num_experts: int):
    """``(sorted_slots [R], slot_pos [R], offsets [E + 1])`` (int32) of expert ids ``[T, k]``: the T * k slots
    stably sorted by expert. Ids outside ``[0, E)`` raise on the CPU; the CUDA kernel drops them rather than
    synchronize to raise (their slots belong to no expert, offsets[E] < R, and their slot_pos is -1, which the
    combine skips: a dropped slot contributes nothing, as Transformers' expert-parallel sentinels)."""
    check_tensor("ids", ids, dtypes=(torch.int32, torch.int64))
    check_device_supported(ids, "moe_permute")
    return torch.ops.sloth.moe_permute(ids, int(num_experts))


def moe_grouped_gemm(x: torch.Tensor, offsets: torch.Tensor, weight: MoEWeight, *, rows=None, trans=False,
                     bias=None, lora_t=None, lora_B=None, scaling: float = 1.0, glu=0, alpha: float = 1.702,
                     limit: float = 7.0, return_pre: bool = False):
    """Grouped GEMM of rows grouped by expert (``offsets [E + 1]`` int32, from :func:`moe_permute`), the input
    row r being ``x[rows[r]]`` (a fused gather) or ``x[r]``:
    ``pre = x_r W_e^T (trans: x_r W_e) + bias[e] + scaling * lora_t[r] lora_B[e]^T``, ``out = glu(pre)``.
    4-bit weights decode inside the GEMM. Returns ``(out, pre)``; ``pre`` is ``[0, out]`` unless a GLU runs
    with ``return_pre``. Traffic (GPU): the weight once per 128-row tile of each expert, x once per 128 output
    columns, out once."""
    if not isinstance(weight, MoEWeight):
        raise TypeError(f"sloth: weight must be a sloth.ops.MoEWeight, got {type(weight).__name__}")
    check_tensor("x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("offsets", offsets, dtypes=(torch.int32,), dim=1, device=x.device)
    if weight.fmt not in _FMT:
        raise ValueError(f"sloth: weight format must be one of {sorted(_FMT)}, got {weight.fmt!r}")
    check_tensor("weight data", weight.data, device=x.device)
    E, A, B = weight.shape
    if offsets.numel() != E + 1:
        raise ValueError(f"sloth: offsets has {offsets.numel()} entries but the weight has {E} experts; pass the "
                         "offsets moe_permute(ids, num_experts) returned")
    K, N = (A, B) if trans else (B, A)
    if x.shape[1] != K:
        raise ValueError(f"sloth: x has {x.shape[1]} features but the expert weight [E, A, B] = {tuple(weight.shape)} "
                         f"takes {K} with trans={trans}")
    if rows is not None:
        check_tensor("rows", rows, dtypes=(torch.int32,), dim=1, device=x.device)
    g = _glu_code(glu)
    if g and N % 2:
        raise ValueError(f"sloth: a GLU needs an even output width, got {N}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, dim=2, device=x.device)
        if tuple(bias.shape) != (E, N):
            raise ValueError(f"sloth: bias must be [E, out] = {(E, N)}, got {tuple(bias.shape)}")
    if (lora_t is None) != (lora_B is None):
        raise ValueError("sloth: pass lora_t and lora_B together")
    if lora_t is not None:
        R = rows.numel() if rows is not None else x.shape[0]
        check_tensor("lora_t", lora_t, dtypes=(x.dtype,), dim=2, device=x.device)
        check_tensor("lora_B", lora_B, dtypes=(x.dtype,), dim=3, device=x.device)
        if lora_t.shape[0] != R or tuple(lora_B.shape) != (E, N, lora_t.shape[1]):
            raise ValueError(f"sloth: lora_t must be [R, r] = [{R}, r] and lora_B [E, out, r] = [{E}, {N}, r]; got "
                             f"{tuple(lora_t.shape)} and {tuple(lora_B.shape)}")
    if weight.fmt == "nf4" and weight.scale is not None and weight.scale.dtype == torch.uint8:
        if weight.code2 is None or weight.absmax2 is None or weight.offset is None:
            raise ValueError("sloth: uint8 NF4 absmax is double-quantized and needs code2, absmax2 and offset")
    check_device_supported(x, "moe_grouped_gemm")
    return torch.ops.sloth.moe_grouped_gemm(
        x, rows, offsets, _FMT[weight.fmt], weight.data, weight.scale, weight.code2, weight.absmax2,
        weight.offset, list(weight.shape), int(weight.blocksize), int(weight.blocksize2), bool(trans), bias, lora_t,
        lora_B, float(scaling), g, float(alpha), float(limit), bool(return_pre))


def moe_glu_backward(dout: torch.Tensor, pre: torch.Tensor, glu, alpha: float = 1.702, limit: float = 7.0):
    """``dpre [R, 2I]`` of ``out = glu(pre)`` given ``dout [R, I]``."""
    check_tensor("dout", dout, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("pre", pre, dtypes=FLOAT_DTYPES, dim=2, device=dout.device)
    g = _glu_code(glu)
    if g == 0:
        raise ValueError("sloth: moe_glu_backward needs a GLU kind (1-4)")
    return torch.ops.sloth.moe_glu_backward(dout, pre, g, float(alpha), float(limit))


def moe_combine(y: torch.Tensor, slot_pos: torch.Tensor, weights: Optional[torch.Tensor], top_k: int):
    """``out [T, H] = sum_j weights[t, j] * y[slot_pos[t * k + j]]`` (gathered by token: no atomics)."""
    check_tensor("y", y, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("slot_pos", slot_pos, dtypes=(torch.int32,), dim=1, device=y.device)
    if weights is not None:
        check_tensor("weights", weights, dtypes=FLOAT_DTYPES, device=y.device)
    return torch.ops.sloth.moe_combine(y, slot_pos, weights, int(top_k))


def moe_combine_backward(dout, y, sorted_slots, slot_pos, weights):
    """``(dy [R, H], dweights [T, k] fp32)`` of :func:`moe_combine`."""
    return torch.ops.sloth.moe_combine_backward(dout, y, sorted_slots, slot_pos, weights)


@torch.library.register_fake("sloth::moe_route")
def _(logits, top_k, kind, renormalize):
    T = logits.shape[0]
    return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int64)


@torch.library.register_fake("sloth::moe_permute")
def _(ids, num_experts):
    R = ids.numel()
    return (ids.new_empty((R,), dtype=torch.int32), ids.new_empty((R,), dtype=torch.int32),
            ids.new_empty((num_experts + 1,), dtype=torch.int32))


@torch.library.register_fake("sloth::moe_grouped_gemm")
def _(x, rows, offsets, fmt, w, scale, code2, absmax2, dq_offset, wshape, blocksize, blocksize2, trans, bias,
      lora_t, lora_B, scaling, glu, alpha, limit, return_pre):
    R = rows.shape[0] if rows is not None else x.shape[0]
    N = wshape[2] if trans else wshape[1]
    Nout = N // 2 if glu else N
    return x.new_empty((R, Nout)), x.new_empty((R if (glu and return_pre) else 0, N))


@torch.library.register_fake("sloth::moe_glu_backward")
def _(dout, pre, glu, alpha, limit):
    return torch.empty_like(pre)


@torch.library.register_fake("sloth::moe_combine")
def _(y, slot_pos, weights, top_k):
    return y.new_empty((slot_pos.shape[0] // top_k, y.shape[1]))


@torch.library.register_fake("sloth::moe_combine_backward")
def _(dout, y, sorted_slots, slot_pos, weights):
    return torch.empty_like(y), weights.new_empty(weights.shape, dtype=torch.float32)
