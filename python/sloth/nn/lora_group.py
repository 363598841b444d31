"""LoRA linears that share their input (an attention's q, k, v projections): one GEMM for all the LoRA A products.

``lora_linear_group(x, projs)`` returns ``[lora_linear(x, *p) for p in projs]`` with the same semantics, but
``t = x [A_1; A_2; ...]^T`` is one GEMM (x read once instead of once per projection), and in backward
``dx = [s_1 dy_1 B_1, ...] [A_1; ...] + sum_i dy_i W_i`` and ``[dA_1; ...] = [s_i dy_i B_i]^T x`` are one GEMM each
over the concatenated rank instead of one per projection. The base products ``x W_i^T`` / ``dy_i W_i`` are as in
:func:`sloth.lora_linear` (fused GEMV for small M, else the dequantized weight in the shared workspace).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .lora_linear import LoraProj, _forward, _proj, as_rows, prepare_args


def _group_forward(ctx, x2d, ws, scalings, abb, need_output: bool):
    """The group's forward: t = x [A_1; ...]^T in one GEMM, then each y_i = x W_i^T + s_i t_i B_i^T (+ bias_i), or
    zeros for them without ``need_output``; saves x and t for the backward."""
    As, Bs, biases = abb[0::3], abb[1::3], abb[2::3]
    ranks = [a.shape[0] for a in As]
    t_all = torch.mm(x2d, torch.cat(As).t())  # [M, sum r]: the shared-input GEMM
    ts = t_all.split(ranks, dim=1)  # [M, r_i] views
    if need_output:
        ys = [_forward(x2d, w, None, B, s, b, t=t.contiguous())[0]
              for w, B, s, b, t in zip(ws, Bs, scalings, biases, ts)]
    else:  # only the backward graph: zeros stand for the outputs
        ys = [x2d.new_zeros(x2d.shape[0], w.shape[0]) for w in ws]
    ctx.ws, ctx.scalings, ctx.ranks = ws, scalings, ranks
    ctx.save_for_backward(x2d, t_all, *As, *Bs)
    return tuple(ys)


class LoraGroupFunction(torch.autograd.Function):
    """Autograd for lora_linear_group on 2-d x: inputs x2d, then (A_i, B_i, bias_i) per projection."""

    @staticmethod
    def forward(ctx, x2d, ws, scalings, *abb):
        return _group_forward(ctx, x2d, ws, scalings, abb, True)

    @staticmethod
    def backward(ctx, *dys):
        x2d, t_all, *ab = ctx.saved_tensors
        n = len(ctx.ws)
        As, Bs = ab[:n], ab[n:]
        need = ctx.needs_input_grad
        dys = [torch.zeros(x2d.shape[0], B.shape[0], dtype=x2d.dtype, device=x2d.device) if dy is None
               else dy.contiguous() for dy, B in zip(dys, Bs)]  # [M, out_i]
        dyB = torch.cat([torch.mm(dy, B) * s for dy, B, s in zip(dys, Bs, ctx.scalings)], dim=1)  # [M, sum r]
        dx = None
        if need[0]:
            dx = torch.mm(dyB, torch.cat(As))  # [M, in]: all the rank-r terms in one GEMM
            for dy, w in zip(dys, ctx.ws):
                dx.addmm_(dy, w.materialize(dy.dtype))  # += dy_i W_i
        dAs = torch.mm(dyB.t(), x2d).split(ctx.ranks) if any(need[3::3]) else [None] * n  # [r_i, in]
        ts = t_all.split(ctx.ranks, dim=1)
        grads = []
        for i in range(n):
            dA = dAs[i] if need[3 + 3 * i] else None
            dB = torch.mm(dys[i].t(), ts[i]).mul_(ctx.scalings[i]) if need[4 + 3 * i] else None  # [out_i, r_i]
            db = dys[i].sum(0) if need[5 + 3 * i] else None
            grads += [dA, dB, db]
        return (dx, None, None, *grads)


class LoraGroupNoOutputFunction(LoraGroupFunction):
    """:class:`LoraGroupFunction` whose forward computes only the LoRA A products (zeros for the outputs): the
    same backward, for a recompute that takes the outputs' values from elsewhere."""

    @staticmethod
    def forward(ctx, x2d, ws, scalings, *abb):
        return _group_forward(ctx, x2d, ws, scalings, abb, False)


def lora_linear_group(x: torch.Tensor, projs: Sequence[LoraProj], need_output: bool = True) -> list[torch.Tensor]:
    """``[sloth.lora_linear(x, *p) for p in projs]`` (``x [..., in]`` -> ``[..., out_i]`` each) with the LoRA A
    products of all projections in one GEMM, forward and backward (see the module docstring). Projections
    without LoRA, or with a trainable dense weight, make it run the projections one by one.
    ``need_output=False`` (a recompute whose outputs' values are taken from elsewhere): zeros stand for the
    outputs, only the LoRA A products are computed, the backward is the same."""
    if any(p.lora_A is None or p.lora_B is None or (p.quant_state is None and p.weight.requires_grad)
           for p in projs) or len(projs) < 2:
        return [_proj(x, p, need_output) for p in projs]
    ws, abb = [], []
    for p in projs:
        w, A, B, bias = prepare_args(x, p.weight, p.lora_A, p.lora_B, p.bias, p.quant_state)
        ws.append(w)
        abb += [A, B, bias]
    in_f = ws[0].shape[1]  # the same for all: prepare_args checked x against each
    lead = x.shape[:-1]
    x2d = as_rows(x, in_f)  # [tokens, in]
    if x2d.shape[0] == 0:
        return [x.new_zeros((*lead, w.shape[0])) for w in ws]
    fn = LoraGroupFunction if need_output else LoraGroupNoOutputFunction
    ys = fn.apply(x2d, ws, [float(p.scaling) for p in projs], *abb)
    return [y.view(*lead, w.shape[0]) for y, w in zip(ys, ws)]
