"""QLoRA / LoRA linear: y = x W^T + s (x A^T) B^T (+ bias) with W frozen (NF4 or dense), A and B trainable.

Paths (same semantics, fp32 accumulation everywhere):
- small M (<= 16 rows, CUDA, bf16/fp16, NF4): one fused kernel reads the packed weight once
  (torch.ops.sloth.nf4_gemv_lora); the tiny t = x A^T is a torch.mm.
- otherwise: dequantize W into a reusable per-device workspace (no per-call allocation; MXFP4 weights are
  dequantized by torch.ops.sloth.mxfp4_dequantize into a fresh buffer from the caching allocator); y = (s t) B^T first
  (a K = r GEMM), then the main cuBLAS GEMM adds x W^T into it (beta = 1: y's read hides in the compute-bound
  GEMM instead of a separate memory-bound pass over [M, out]). CPU runs this path with the CPU kernels.
Backward: dx = s (dy B) A, then += dy W (W dequantized again into the workspace; keeping the forward's copy for
the backward was measured slower end to end on an H200), dA = s (dy B)^T x, dB = s dy^T t.
Saved: x and t = x A^T, as s t where the forward made that product anyway (never the dequantized W).
Without its output (``need_output=False``, for a recompute whose result is never read): only t = x A^T is computed
and y is zeros; the backward is the same.
"""

from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch

from ..ops._checks import FLOAT_DTYPES, check_device_supported, check_tensor
from ..ops.mxfp4 import MX_BLOCK, MXFP4State, mxfp4_dequantize
from ..ops.qlora import NF4Args, gemv_available, nf4_gemv_lora
from ..runtime.workspace import Workspace


class _Weight:
    """The frozen weight: dense [out, in], NF4 (NF4Args) or MXFP4 (blocks [out, in / 32, 16] + scales [out,
    in / 32]); ``materialize`` gives a dense [out, in] of dtype."""

    def __init__(self, weight: torch.Tensor, quant_state):
        self.dense = self.nf4 = self.mx = None
        if quant_state is None:
            self.dense = weight
            self.shape = tuple(weight.shape)
        elif isinstance(quant_state, MXFP4State):
            s = quant_state.scales
            if weight.dtype != torch.uint8 or weight.dim() != 3 or weight.shape[2] != MX_BLOCK // 2 or \
                    s.dtype != torch.uint8 or tuple(s.shape) != tuple(weight.shape[:2]):
                raise ValueError(f"sloth.lora_linear: an MXFP4 weight is uint8 blocks [out, in / 32, 16] with uint8 "
                                 f"scales [out, in / 32] (sloth.mxfp4_quantize of the [out, in] weight); got "
                                 f"{weight.dtype} {tuple(weight.shape)} and {s.dtype} {tuple(s.shape)}")
            self.mx = (weight, s)
            self.shape = (weight.shape[0], weight.shape[1] * MX_BLOCK)
        else:
            self.nf4 = NF4Args.from_state(weight, quant_state)
            self.shape = self.nf4.shape

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.dense is not None:
            return self.dense if self.dense.dtype == dtype else self.dense.to(dtype)
        if self.mx is not None:
            return mxfp4_dequantize(*self.mx, dtype)  # [out, in]
        out, inn = self.shape
        buf = Workspace.get(out * inn, dtype, self.nf4.packed.device)
        return self.nf4.dequantize_into(buf).view(out, inn)  # [out, in], valid until the next Workspace.get


def _forward(x2d, w: _Weight, A, B, scaling, bias, t=None):
    # x2d [M, in], A [r, in] or None, B [out, r] or None, bias [out] or None -> (y [M, out], t [M, r] or None,
    # whether t is scaled); t = x2d A^T when given (A is then None). t comes back multiplied by scaling where y
    # needed that product anyway (the backward's dB = dy^T (s t) then needs no scaling of its own).
    if A is not None:
        t = torch.mm(x2d, A.t())  # [M, r]
    if w.nf4 is not None and gemv_available(x2d, w.nf4):
        return nf4_gemv_lora(x2d, w.nf4, t, B, scaling, bias), t, False
    W = w.materialize(x2d.dtype)  # [out, in]
    if t is not None and bias is None:
        ts = t * scaling  # [M, r]
        return torch.mm(ts, B.t()).addmm_(x2d, W.t()), ts, True  # [M, out]: the K = r GEMM first, then beta = 1
    y = torch.mm(x2d, W.t()) if bias is None else torch.addmm(bias, x2d, W.t())  # [M, out]
    if t is not None:
        y.addmm_(t, B.t(), alpha=scaling)
    return y, t, False


class LoraLinearFunction(torch.autograd.Function):
    """Autograd for lora_linear on 2-d x; the frozen weight gets no gradient unless it is dense and requires it."""

    @staticmethod
    def forward(ctx, x2d, A, B, bias, weight_t, w: _Weight, scaling: float, need_output: bool):
        if need_output:
            y, t, scaled = _forward(x2d, w, A, B, scaling, bias)
        else:  # only the backward graph: zeros stand for y
            t, scaled = (torch.mm(x2d, A.t()) if A is not None else None), False  # [M, r]
            y = x2d.new_zeros(x2d.shape[0], w.shape[0])  # [M, out]
        ctx.w, ctx.scaling, ctx.t_scaled = w, scaling, scaled
        ctx.save_for_backward(x2d, t, A, B)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, t, A, B = ctx.saved_tensors
        w, s = ctx.w, ctx.scaling
        need_x, need_A, need_B, need_bias, need_w = ctx.needs_input_grad[:5]
        dy = dy.contiguous()  # [M, out]
        dx = dA = dB = dbias = dW = None
        dyBs = torch.mm(dy, B).mul_(s) if (A is not None and (need_x or need_A)) else None  # [M, r]: s dy B
        if need_x:
            W = w.materialize(dy.dtype)  # [out, in]
            if dyBs is not None:
                dx = torch.mm(dyBs, A).addmm_(dy, W)  # [M, in]: the K = r GEMM first, then beta = 1
            else:
                dx = torch.mm(dy, W)  # [M, in]
        if need_A:
            dA = torch.mm(dyBs.t(), x2d)  # [r, in]
        if need_B:
            dB = torch.mm(dy.t(), t)  # [out, r]
            if not ctx.t_scaled:
                dB.mul_(s)
        if need_bias:
            dbias = dy.sum(0)
        if need_w:
            dW = torch.mm(dy.t(), x2d)  # [out, in] (dense trainable weight only)
        return dx, dA, dB, dbias, dW, None, None, None


def prepare_args(x, weight, lora_A, lora_B, bias, quant_state):
    """Checks lora_linear's arguments (clear errors for dtype, device, shape); returns ``(w, lora_A, lora_B, bias)``
    with the weight wrapped (_Weight) and A, B, bias cast to x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_device_supported(x, "lora_linear")
    if quant_state is None:
        if weight.dtype not in FLOAT_DTYPES and not weight.is_floating_point():
            raise TypeError(f"sloth.lora_linear: weight has dtype {weight.dtype} and no quant_state; a packed NF4 "
                            "weight needs its quant_state (the bitsandbytes QuantState, e.g. param.quant_state, "
                            "or the NF4State from sloth.nf4_quantize)")
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2, device=x.device)
    else:
        check_tensor("weight", weight, device=x.device)
    w = _Weight(weight, quant_state)
    out_f, in_f = w.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"sloth: x has shape {tuple(x.shape)} but the weight is [out={out_f}, in={in_f}]; "
                         f"the last dimension of x must be {in_f}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("sloth: pass both lora_A and lora_B, or neither")
    dt = x.dtype
    if lora_A is not None:
        check_tensor("lora_A", lora_A, dtypes=FLOAT_DTYPES, dim=2, device=x.device)
        check_tensor("lora_B", lora_B, dtypes=FLOAT_DTYPES, dim=2, device=x.device)
        if lora_A.shape[1] != in_f:
            raise ValueError(f"sloth: lora_A must be [r, in={in_f}], got {tuple(lora_A.shape)}")
        if lora_B.shape[0] != out_f:
            raise ValueError(f"sloth: lora_B must be [out={out_f}, r], got {tuple(lora_B.shape)}")
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"sloth: rank mismatch: lora_A is {tuple(lora_A.shape)} (r={lora_A.shape[0]}) but "
                             f"lora_B is {tuple(lora_B.shape)} (r={lora_B.shape[1]})")
        if lora_A.dtype != dt:
            lora_A = lora_A.to(dt)
        if lora_B.dtype != dt:
            lora_B = lora_B.to(dt)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=x.device)
        if bias.shape != (out_f,):
            raise ValueError(f"sloth: bias must be [out={out_f}], got {tuple(bias.shape)}")
        if bias.dtype != dt:
            bias = bias.to(dt)
    return w, lora_A, lora_B, bias


def as_rows(x: torch.Tensor, in_f: int) -> torch.Tensor:
    """x [..., in] as a contiguous [tokens, in]."""
    x2d = x.reshape(math.prod(x.shape[:-1]), in_f)  # [tokens, in] (not -1: in may be 0)
    return x2d if x2d.is_contiguous() else x2d.contiguous()


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float = 1.0,
    *,
    bias: Optional[torch.Tensor] = None,
    quant_state=None,
) -> torch.Tensor:
    """``y = x W^T + scaling * (x A^T) B^T + bias`` with a frozen W, differentiable in x, A, B (and bias).

    Shapes: ``x [..., in]``, ``weight`` dense ``[out, in]`` (bf16 / fp16 / fp32) or packed NF4 (bitsandbytes
    ``Params4bit`` data, any storage dtype) with ``quant_state`` (bitsandbytes ``QuantState`` or sloth
    ``NF4State``, shape ``[out, in]``) or packed MXFP4 (``blocks [out, in / 32, 16]`` from
    :func:`sloth.mxfp4_quantize`, with ``quant_state = sloth.MXFP4State(scales)``), ``lora_A [r, in]``,
    ``lora_B [out, r]``, ``bias [out]`` -> ``y [..., out]`` in x's dtype. A, B and bias are cast to x's dtype
    (gradients flow back to their own dtype). Pass ``lora_A = lora_B = None`` for a plain (quantized) linear.
    """
    return _lora_linear(x, weight, lora_A, lora_B, scaling, bias, quant_state, True)


def _lora_linear(x, weight, lora_A, lora_B, scaling, bias, quant_state, need_output: bool) -> torch.Tensor:
    """:func:`lora_linear`; ``need_output=False`` gives zeros for y with the same backward (see the module
    docstring)."""
    w, lora_A, lora_B, bias = prepare_args(x, weight, lora_A, lora_B, bias, quant_state)
    out_f, in_f = w.shape
    lead = x.shape[:-1]
    x2d = as_rows(x, in_f)  # [tokens, in]
    weight_t = w.dense if (w.dense is not None and w.dense.requires_grad) else None
    if x2d.shape[0] == 0:  # no tokens: an empty y whose backward gives zero gradients (products of empty rows)
        y = x2d.new_zeros((0, out_f))
        if lora_A is not None and lora_B is not None:
            y = y + float(scaling) * ((x2d @ lora_A.t()) @ lora_B.t())
        if weight_t is not None:
            y = y + x2d @ weight_t.t().to(x2d.dtype)
        if bias is not None:
            y = y + bias
        return y.view(*lead, out_f)
    y = LoraLinearFunction.apply(x2d, lora_A, lora_B, bias, weight_t, w, float(scaling), need_output)  # [tokens, out]
    return y.view(*lead, out_f)


class LoraProj(NamedTuple):
    """One projection (of an MLP, an attention): the arguments of :func:`sloth.lora_linear`."""

    weight: torch.Tensor
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    scaling: float = 1.0
    bias: Optional[torch.Tensor] = None
    quant_state: object = None


def _proj(x, p: LoraProj, need_output: bool = True):
    return _lora_linear(x, p.weight, p.lora_A, p.lora_B, p.scaling, p.bias, p.quant_state, need_output)
