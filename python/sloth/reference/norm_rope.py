"""Plain-PyTorch RMSNorm and RoPE (the oracle of torch.ops.sloth.rms_norm_* / rope_), written for clarity."""

from __future__ import annotations

import torch


def rms_norm_forward(x, weight, eps: float, offset: float = 0.0, cast_before_weight: bool = True):
    """(y in x's dtype, rstd fp32 [rows]): fp32 math; ``cast_before_weight`` rounds x * rstd to x's dtype first
    (LlamaRMSNorm), else a single rounding at the end (Gemma3RMSNorm)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    n = xf * rstd[:, None]
    if cast_before_weight:
        n = n.to(x.dtype).float()
    return (n * (offset + weight.float())).to(x.dtype), rstd


def rms_norm_backward(dy, x, weight, eps: float, offset: float = 0.0, cast_before_weight: bool = True):
    """(dx fp32, dw fp32) by autograd through the fp32 forward (roundings straight-through)."""
    xf = x.detach().float().requires_grad_()
    wf = weight.detach().float().requires_grad_()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    if cast_before_weight:
        n = n + (n.detach().to(x.dtype).float() - n.detach())  # straight-through rounding
    y = n * (offset + wf)
    return torch.autograd.grad(y, (xf, wf), dy.float())


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x, cos, sin, inverse: bool = False):
    """x [tokens, heads, D] -> fp32 result with the first rot_dim dims rotated (HF rotate_half), cos / sin
    [tokens, rot_dim]; ``inverse`` applies the transpose of the rotation."""
    rot = cos.shape[-1]
    xf = x.float()
    xr, xp = xf[..., :rot], xf[..., rot:]
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    if not inverse:
        out = xr * c + rotate_half(xr) * s
    else:
        # transpose of y = C x + S R x: x = C y + R^T (S y), R^T v = [v2, -v1]
        v = xr * s
        h = rot // 2
        out = xr * c + torch.cat((v[..., h:], -v[..., :h]), dim=-1)
    return torch.cat((out, xp), dim=-1)
