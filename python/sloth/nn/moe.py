"""Differentiable MoE experts and routing on torch.ops.sloth.moe_* (forward and backward).

``moe_experts(x, ids, weights, spec)`` computes what Transformers' experts modules compute,
``out[t] = sum_j weights[t, j] * down_e(glu(gate_up_e(x[t])))`` with ``e = ids[t, j]``:
permute (counting sort), grouped GEMM with the gather, bias, LoRA and GLU fused, grouped GEMM down, combine
gathered by token. Backward: dX through the transposed (possibly 4-bit) weights, dW for trainable 16-bit
experts, dA / dB for per-expert LoRA, d bias, and the router weights' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ops.moe import MoEWeight, moe_combine, moe_combine_backward, moe_glu_backward, moe_grouped_gemm, moe_permute

__all__ = ["MoEExpertsSpec", "MoEExpertsFunction", "moe_experts", "moe_route", "MoERouteFunction"]


@dataclass
class MoEExpertsSpec:
    """The experts of one MoE layer. ``gate_up`` / ``down`` are :class:`MoEWeight` stacks; with ``*_trans``
    False they are stored ``[E, out, in]`` (Qwen3-MoE, every NF4 / MXFP4 stack), with True ``[E, in, out]``
    (gpt-oss bf16). ``glu`` is a GLU code of :data:`sloth.ops.moe.GLU_KINDS`. ``lora`` maps ``"gate_up"`` /
    ``"down"`` to ``(A [E, r, in], B [E, out, r])``; its output is scaled by ``scaling``."""

    gate_up: MoEWeight
    down: MoEWeight
    gate_up_trans: bool = False
    down_trans: bool = False
    gate_up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None
    glu: int = 1
    alpha: float = 1.702
    limit: float = 7.0
    lora: dict = field(default_factory=dict)
    scaling: float = 1.0

    @property
    def num_experts(self) -> int:
        return self.gate_up.num_experts


def _expert_of_rows(offsets: torch.Tensor, R: int) -> torch.Tensor:
    """[R] int64: the expert of each sorted row (no host synchronization); E for rows past offsets[E] (slots
    the CUDA permute dropped for an out-of-range id)."""
    return torch.searchsorted(offsets[1:].long(), torch.arange(R, device=offsets.device), right=True)


def _per_expert_sum(t: torch.Tensor, erow: torch.Tensor, E: int) -> torch.Tensor:
    """[E, N] fp32 sums of the rows of t [R, N] by expert (rows of no expert left out)."""
    valid = (erow < E)[:, None]
    return torch.zeros(E, t.shape[1], dtype=torch.float32, device=t.device).index_add_(
        0, erow.clamp(max=E - 1), torch.where(valid, t.float(), 0.0))


def _per_expert_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, E: int) -> torch.Tensor:
    """[E, m, n] = a_e^T b_e over each expert's rows of a [R, m], b [R, n] (a variable-K grouped GEMM).
    CUDA bf16: one torch._grouped_mm (2-D x 2-D, groups along K); elsewhere one GEMM per expert with tokens
    after a single host synchronization on the offsets."""
    if a.is_cuda and a.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(a.t(), b, offs=offsets[1:])
        except (RuntimeError, TypeError):
            pass
    out = a.new_zeros((E, a.shape[1], b.shape[1]))
    off = offsets.tolist()
    for e in range(E):
        lo, hi = off[e], off[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
    return out


def _dense(t: torch.Tensor) -> MoEWeight:
    return MoEWeight("dense", t, tuple(t.shape))


class MoEExpertsFunction(torch.autograd.Function):
    """Experts forward / backward; see :func:`moe_experts`. The dense stacks, biases and LoRA factors are
    inputs so that autograd sees them; quantized stacks travel in ``spec``."""

    @staticmethod
    def forward(ctx, x, ids, weights, gu_w, d_w, gu_b, d_b, gu_A, gu_B, d_A, d_B, spec: MoEExpertsSpec):
        T, k = ids.shape
        E = spec.num_experts
        sorted_slots, slot_pos, offsets = moe_permute(ids, E)
        tok = torch.div(sorted_slots, k, rounding_mode="floor")  # [R] int32: token of each sorted row
        gu = spec.gate_up if gu_w is None else _dense(gu_w)
        dn = spec.down if d_w is None else _dense(d_w)
        s = spec.scaling
        lt1 = moe_grouped_gemm(x, offsets, _dense(gu_A), rows=tok)[0] if gu_A is not None else None  # [R, r]
        need_pre = any(ctx.needs_input_grad)
        h, pre = moe_grouped_gemm(x, offsets, gu, rows=tok, trans=spec.gate_up_trans, bias=gu_b, lora_t=lt1,
                                  lora_B=gu_B, scaling=s, glu=spec.glu, alpha=spec.alpha, limit=spec.limit,
                                  return_pre=need_pre)  # h [R, I], pre [R, 2I]
        lt2 = moe_grouped_gemm(h, offsets, _dense(d_A))[0] if d_A is not None else None
        y = moe_grouped_gemm(h, offsets, dn, trans=spec.down_trans, bias=d_b, lora_t=lt2, lora_B=d_B,
                             scaling=s)[0]  # [R, H]
        out = moe_combine(y, slot_pos, weights, k)  # [T, H]
        ctx.spec, ctx.k, ctx.has = spec, k, (gu_w is not None, d_w is not None)
        ctx.save_for_backward(x, weights, sorted_slots, slot_pos, offsets, tok, pre, h, y, lt1, lt2, gu_w, d_w,
                              gu_A, gu_B, d_A, d_B)
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, weights, sorted_slots, slot_pos, offsets, tok, pre, h, y, lt1, lt2, gu_w, d_w, gu_A, gu_B, d_A,
         d_B) = ctx.saved_tensors
        spec, k = ctx.spec, ctx.k
        E, s = spec.num_experts, spec.scaling
        need = ctx.needs_input_grad
        gu = spec.gate_up if gu_w is None else _dense(gu_w)
        dn = spec.down if d_w is None else _dense(d_w)
        dout = dout.contiguous().to(y.dtype)
        dy, dweights = moe_combine_backward(dout, y, sorted_slots, slot_pos, weights)  # [R, H], [T, k]
        g = {}
        # ---- down: y = h Wd^T + b + s (h A^T) B^T
        lt_back = lB_back = None
        if d_A is not None:
            dlt2 = moe_grouped_gemm(dy, offsets, _dense(d_B), trans=True)[0]  # [R, r] = dy B_e (unscaled)
            lt_back, lB_back = dlt2, d_A.transpose(1, 2).contiguous()  # dh += s * dlt2 A_e
            if need[10]:
                g["d_B"] = s * _per_expert_outer(dy, lt2, offsets, E)
            if need[9]:
                g["d_A"] = s * _per_expert_outer(dlt2, h, offsets, E)
        dh = moe_grouped_gemm(dy, offsets, dn, trans=not spec.down_trans, lora_t=lt_back, lora_B=lB_back,
                              scaling=s)[0]  # [R, I]
        if need[4]:
            g["d_w"] = (_per_expert_outer(h, dy, offsets, E) if spec.down_trans
                        else _per_expert_outer(dy, h, offsets, E))
        erow = None
        if need[6]:
            erow = _expert_of_rows(offsets, dy.shape[0])
            g["d_b"] = _per_expert_sum(dy, erow, E)
        # ---- GLU
        dpre = moe_glu_backward(dh, pre, spec.glu, spec.alpha, spec.limit)  # [R, 2I]
        # ---- gate_up: pre = x[tok] Wgu^T + b + s (x[tok] A^T) B^T
        lt_back = lB_back = None
        if gu_A is not None:
            dlt1 = moe_grouped_gemm(dpre, offsets, _dense(gu_B), trans=True)[0]  # [R, r]
            lt_back, lB_back = dlt1, gu_A.transpose(1, 2).contiguous()
            if need[8]:
                g["gu_B"] = s * _per_expert_outer(dpre, lt1, offsets, E)
            if need[7]:
                g["gu_A"] = s * _per_expert_outer(dlt1, x[tok], offsets, E)
        dx = None
        if need[0]:
            dxs = moe_grouped_gemm(dpre, offsets, gu, trans=not spec.gate_up_trans, lora_t=lt_back, lora_B=lB_back,
                                   scaling=s)[0]  # [R, H]
            dx = moe_combine(dxs, slot_pos, None, k)  # [T, H]: sum over the token's k slots
        if need[3]:
            xs = x[tok]
            g["gu_w"] = (_per_expert_outer(xs, dpre, offsets, E) if spec.gate_up_trans
                         else _per_expert_outer(dpre, xs, offsets, E))
        if need[5]:
            erow = erow if erow is not None else _expert_of_rows(offsets, dpre.shape[0])
            g["gu_b"] = _per_expert_sum(dpre, erow, E)

        def cast(name, like):
            t = g.get(name)
            return None if t is None else t.to(like.dtype)

        dw = dweights.to(weights.dtype) if need[2] else None
        return (dx, None, dw, cast("gu_w", gu_w) if gu_w is not None else None,
                cast("d_w", d_w) if d_w is not None else None,
                cast("gu_b", spec.gate_up_bias) if need[5] else None, cast("d_b", spec.down_bias) if need[6] else None,
                cast("gu_A", gu_A) if need[7] else None, cast("gu_B", gu_B) if need[8] else None,
                cast("d_A", d_A) if need[9] else None, cast("d_B", d_B) if need[10] else None, None)


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, spec: MoEExpertsSpec) -> torch.Tensor:
    """``[T, H]`` output of the experts for hidden states ``x [T, H]``, expert ids ``[T, k]`` and routing
    weights ``[T, k]`` (differentiable: the router gradient flows through them)."""
    gu_w = spec.gate_up.data if spec.gate_up.fmt == "dense" else None
    d_w = spec.down.data if spec.down.fmt == "dense" else None
    gu_A, gu_B = spec.lora.get("gate_up", (None, None))
    d_A, d_B = spec.lora.get("down", (None, None))
    dt = x.dtype
    cast = lambda t: None if t is None else t.to(dt)  # noqa: E731  (LoRA factors and dense stacks in x's dtype)
    return MoEExpertsFunction.apply(x, ids, weights, cast(gu_w), cast(d_w), spec.gate_up_bias, spec.down_bias,
                                    cast(gu_A), cast(gu_B), cast(d_A), cast(d_B), spec)


class MoERouteFunction(torch.autograd.Function):
    """Routing weights with their gradient to the router logits (the ids carry none)."""

    @staticmethod
    def forward(ctx, logits, top_k, kind, renormalize):
        from ..ops.moe import moe_route as _route

        w, ids = _route(logits, top_k, kind, renormalize)
        ctx.save_for_backward(logits, w, ids)
        ctx.kind, ctx.renormalize = kind, renormalize
        ctx.mark_non_differentiable(ids)
        return w, ids

    @staticmethod
    def backward(ctx, dw, _dids):
        logits, w, ids = ctx.saved_tensors
        dw = dw.float()
        z = logits.float()
        dz = torch.zeros_like(z)
        if ctx.kind in ("topk_softmax", 1):  # w = softmax(z[ids])
            dz.scatter_(1, ids, w * (dw - (dw * w).sum(-1, keepdim=True)))
        else:  # w = p[ids] (/ sum p[ids]), p = softmax(z)
            p = torch.softmax(z, dim=-1)
            if ctx.renormalize:
                ssum = p.gather(1, ids).sum(-1, keepdim=True)
                dpk = (dw - (dw * w).sum(-1, keepdim=True)) / ssum
            else:
                dpk = dw
            dp = torch.zeros_like(p).scatter_(1, ids, dpk)
            dz = p * (dp - (dp * p).sum(-1, keepdim=True))
        return dz.to(logits.dtype), None, None, None


def moe_route(logits: torch.Tensor, top_k: int, kind="softmax_topk", renormalize: bool = False):
    """Differentiable ``(weights [T, k] fp32, ids [T, k] int64)``; see :func:`sloth.ops.moe_route`."""
    return MoERouteFunction.apply(logits, top_k, kind, renormalize)
