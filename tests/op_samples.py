"""One table of sample calls for every registered ``torch.ops.sloth`` op: what :mod:`test_opcheck` feeds to
``torch.library.opcheck`` (schema, fake kernel, autograd registration, dynamic-shape tracing). A new op adds its
samples here; ``test_every_op_has_samples`` fails until it does."""

import torch

from sloth.ops.moe import MoEWeight
from sloth.reference.nf4 import dynamic_code


def _nf4(device):
    x = torch.randn(5, 70, device=device, dtype=torch.bfloat16)
    packed, absmax = torch.ops.sloth.nf4_quantize(x, 64)
    q, absmax2 = torch.ops.sloth.blockwise8_quantize(absmax, dynamic_code(device), 256)
    return x, packed, absmax, q, absmax2, torch.tensor(0.1, device=device)


def nf4_ops(device):
    x, packed, absmax, q, absmax2, offset = _nf4(device)
    code = dynamic_code(device)
    w = torch.randn(24, 64, device=device, dtype=torch.bfloat16)  # [N, K]
    wp, wa = torch.ops.sloth.nf4_quantize(w, 64)
    xs = torch.randn(3, 64, device=device, dtype=torch.bfloat16)  # [M, K], M <= 16
    A, B = torch.randn(3, 4, device=device, dtype=torch.bfloat16), torch.randn(24, 4, device=device, dtype=torch.bfloat16)
    return {
        "nf4_quantize": [(x, 64)],
        "nf4_dequantize": [(packed, absmax, [5, 70], 64, torch.float16),
                           (packed, q, [5, 70], 64, torch.bfloat16, code, absmax2, offset, 256)],
        "nf4_dequantize_out": [(packed, absmax, 64, None, None, None, 256,
                                torch.empty(5, 70, device=device, dtype=torch.float32))],
        "blockwise8_quantize": [(absmax, code, 256)],
        "nf4_gemv_lora": [(xs, wp, wa, 24, 64, None, None, None, 256, None, None, 1.0, None),
                          (xs, wp, wa, 24, 64, None, None, None, 256, A, B, 0.5, torch.randn(24, device=device,
                                                                                            dtype=torch.bfloat16))],
    }


def mxfp4_ops(device):
    xm = torch.randn(3, 64, device=device)
    blocks, scales = torch.ops.sloth.mxfp4_quantize(xm)
    return {"mxfp4_quantize": [(xm,)], "mxfp4_dequantize": [(blocks, scales, torch.bfloat16)]}


def loss_ops(device):
    rows, v, h = 6, 40, 8
    logits = torch.randn(rows, v, device=device)
    labels = torch.tensor([1, 5, -100, 39, 0, 7], device=device)
    g = torch.rand(rows, device=device)
    w = torch.randn(v, h, device=device)
    state, acc = torch.zeros(rows, 4, device=device), torch.zeros(rows, h, device=device)
    torch.ops.sloth.ce_online_block(logits[:, :16].clone(), labels, 0, state, acc, 0.0, 1.0, 8.0)
    return {
        "cross_entropy_chunk": [(logits.clone(), labels, g, None, 1.0, -100, 0.0, 1.0, True),
                                (logits.clone(), labels, None, g, 0.5, -100, 3.0, 2.0, False)],
        "ce_online_block": [(logits[:, 16:32].clone(), labels, 16, state.clone(), acc.clone(), 2.0, 0.5, 0.0)],
        "ce_online_finish": [(state, acc, w, labels, None, -100, torch.empty(rows, h, device=device)),
                             (state, acc, w, labels, g, -100, torch.empty(rows, h, device=device))],
    }


def elementwise_ops(device):
    x, w = torch.randn(4, 40, device=device), torch.randn(40, device=device)
    _, rstd = torch.ops.sloth.rms_norm_forward(x, w, 1e-6, 0.0, True)
    pos = torch.arange(4, device=device, dtype=torch.float32)[:, None]
    freq = torch.arange(8, device=device, dtype=torch.float32)[None, :]
    ang = torch.cat([pos * freq, pos * freq], -1) * 0.1  # [tokens, 16]
    cos, sin = ang.cos(), ang.sin()
    gate, up = torch.randn(5, 12, device=device), torch.randn(5, 12, device=device)
    return {
        "rms_norm_forward": [(x, w, 1e-6, 1.0, False)],
        "rms_norm_backward": [(torch.randn_like(x), x, w, rstd, 0.0, True, True)],
        "rope_": [(torch.randn(4, 2, 16, device=device), torch.randn(4, 1, 16, device=device), cos, sin, False)],
        "rope": [(torch.randn(4, 2, 16, device=device), torch.randn(4, 1, 16, device=device), cos[:, :8], sin[:, :8],
                  True)],
        "glu_forward": [(gate, up, k) for k in range(3)],
        "glu_backward": [(torch.randn(5, 12, device=device), gate.clone(), up.clone(), 1)],
    }


def attention_ops(device):
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator(device).manual_seed(4)
    q = torch.randn(1, 9, 4, 64, device=device, dtype=dt, generator=gen)  # [batch, seq, heads, dim]
    k = torch.randn(1, 9, 2, 64, device=device, dtype=dt, generator=gen)
    v = torch.randn(1, 9, 2, 64, device=device, dtype=dt, generator=gen)
    sinks = torch.randn(4, device=device, generator=gen)
    fwd = (q, k, v, sinks, None, None, 0, 0, 0.125, True, 4, 0.0)
    out, lse = torch.ops.sloth.attention_forward(*fwd)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    return {
        "attention_forward": [fwd, (q[0], k[0], v[0], None, cu, cu, 5, 5, 0.125, True, -1, 2.0)],
        "attention_backward": [(torch.randn_like(out), q, k, v, out, lse, sinks, None, None, 0, 0, 0.125, True, 4,
                                0.0)],
    }


def moe_ops(device):
    E, T, k, K, N = 4, 5, 2, 32, 16
    ids = torch.randint(0, E, (T, k), device=device)
    ss, sp, off = torch.ops.sloth.moe_permute(ids, E)
    rows = torch.div(ss, k, rounding_mode="floor")
    x = torch.randn(T, K, device=device)
    w = MoEWeight.quantize_mxfp4(torch.randn(E, N, K, device=device))
    return {
        "moe_route": [(torch.randn(T, E, device=device), k, 0, True), (torch.randn(T, E, device=device), k, 1, False)],
        "moe_permute": [(ids, E)],
        "moe_grouped_gemm": [(x, rows, off, 2, w.data, w.scale, None, None, None, list(w.shape), 64, 256, False,
                              torch.randn(E, N, device=device), None, None, 1.0, 3, 1.702, 7.0, True)],
        "moe_glu_backward": [(torch.randn(T, 8, device=device), torch.randn(T, 16, device=device), 1, 1.702, 7.0)],
        "moe_combine": [(torch.randn(T * k, 8, device=device), sp, torch.rand(T, k, device=device), k)],
        "moe_combine_backward": [(torch.randn(T, 8, device=device), torch.randn(T * k, 8, device=device), ss, sp,
                                  torch.rand(T, k, device=device))],
    }


FAMILIES = (nf4_ops, mxfp4_ops, loss_ops, elementwise_ops, attention_ops, moe_ops)


def samples(device) -> dict:
    """op name -> [args tuple, ...] for every op, on ``device``."""
    out = {}
    for family in FAMILIES:
        out.update(family(device))
    return out


def registered_ops() -> set:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sloth::")}
