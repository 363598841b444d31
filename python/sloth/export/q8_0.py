"""GGML's Q8_0 quantization: blocks of 32 values along the last dimension, each stored as an fp16 scale ``d`` and
32 int8 ``q`` (34 bytes), ``x ~ d * q`` with ``d = max|x| / 127`` and ``q = round(x / d)`` (halves away from zero),
as llama.cpp's reference quantizer computes it (the division uses the fp32 ``d``; the stored one is rounded)."""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK  # fp16 scale + 32 int8


def quantize_q8_0(x: torch.Tensor) -> np.ndarray:
    """Q8_0 bytes of ``x [..., K]`` (K a multiple of 32): uint8 ``[..., K // 32 * 34]``, the layout GGUF stores."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"sloth q8_0: the last dimension must be a multiple of {BLOCK}, got {tuple(x.shape)}")
    lead = x.shape[:-1]
    blocks = x.detach().to("cpu", torch.float32).reshape(-1, BLOCK)  # [n, 32]
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # [n, 1] fp32
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = blocks * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # round half away from zero
    q = q.to(torch.int8).view(torch.uint8)  # [n, 32]
    dh = d.to(torch.float16).view(torch.uint8)  # [n, 2] little-endian fp16 bytes
    out = torch.cat([dh, q], dim=1)  # [n, 34]
    return out.reshape(*lead, -1).numpy()


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    """Values of Q8_0 bytes ``[..., nb * 34]`` as fp32 ``[..., nb * 32]``."""
    data = np.asarray(data, dtype=np.uint8)
    lead = data.shape[:-1]
    blocks = data.reshape(-1, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # [n, 32]
    return (q * d).reshape(*lead, -1)


__all__ = ["BLOCK", "BLOCK_BYTES", "dequantize_q8_0", "quantize_q8_0"]
