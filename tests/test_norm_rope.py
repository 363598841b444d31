"""RMSNorm and RoPE: forward and backward against the fp32 reference (sloth.reference.norm_rope)."""

import pytest
import torch

import sloth
from sloth import reference
from sloth.ops import rms_norm_backward, rms_norm_forward, rope, rope_

from conftest import DEVICES

# Relative to max |reference|: fp32 math from the same rounded inputs; the difference is the final rounding
# (2^-8 bf16, 2^-11 fp16) plus fp32 reduction-order noise.
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 8), (3, 333), (17, 64), (5, 1000), (2, 4096), (0, 24)])
def test_rms_norm(device, dtype, family, shape):
    offset, cast = (0.0, True) if family == "llama" else (1.0, False)
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(shape, generator=g)).to(dtype).to(device)
    w = (1 + 0.3 * torch.randn(shape[1], generator=g)).to(dtype).to(device)
    dy = torch.randn(shape, generator=g).to(dtype).to(device)
    y, rstd = rms_norm_forward(x, w, 1e-6, offset, cast)
    y_ref, rstd_ref = reference.norm_rope.rms_norm_forward(x, w, 1e-6, offset, cast)
    assert y.dtype == dtype and y.shape == x.shape and rstd.dtype == torch.float32 and rstd.shape == (shape[0],)
    dx, dw = rms_norm_backward(dy, x, w, rstd, offset, cast)
    assert dx.dtype == dtype and dw.dtype == torch.float32 and dw.shape == (shape[1],)
    if shape[0] == 0:
        assert torch.equal(dw, torch.zeros_like(dw))
        return
    assert rel_err(rstd, rstd_ref) <= 4e-6  # fp32 sums in another order
    assert rel_err(y, y_ref) <= TOL[dtype]
    dx_ref, dw_ref = reference.norm_rope.rms_norm_backward(dy, x, w, 1e-6, offset, cast)
    assert rel_err(dx, dx_ref) <= TOL[dtype] * 2
    # fp32 accumulation of the same products; in the Llama order round(x * rstd) may flip by one ulp
    assert rel_err(dw, dw_ref) <= (TOL[dtype] if cast and dtype != torch.float32 else 1e-5)
    _, dw_none = rms_norm_backward(dy, x, w, rstd, offset, cast, compute_dw=False)
    assert dw_none.numel() == 0


def test_rms_norm_matches_transformers_rounding():
    """bf16: Llama rounds x * rstd before the weight multiply, Gemma 3 rounds once: match each exactly-ish."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(64, 333).bfloat16()
    for cls, offset, cast in ((LlamaRMSNorm, 0.0, True), (Gemma3RMSNorm, 1.0, False)):
        m = cls(333, eps=1e-6)
        with torch.no_grad():
            m.weight.copy_(torch.randn(333))
        m = m.bfloat16()
        want = m(x)
        got = sloth.rms_norm(x, m.weight, 1e-6, offset, cast)
        # at most one bf16 ulp apart (rstd differs in the last fp32 bits), almost all equal
        diff = (got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)
        assert diff.max() <= 2 ** -7 and (got == want).float().mean() > 0.97, cls.__name__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_autograd(device, dtype):
    x = torch.randn(2, 5, 48, device=device).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(48, device=device)).to(dtype).requires_grad_()
    y = sloth.rms_norm(x, w, 1e-5, 1.0, False)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx_ref, dw_ref = reference.norm_rope.rms_norm_backward(dy.reshape(10, 48), x.reshape(10, 48), w, 1e-5, 1.0, False)
    assert x.grad.shape == x.shape and w.grad.dtype == dtype
    assert rel_err(x.grad.reshape(10, 48), dx_ref) <= TOL[dtype] * 2
    assert rel_err(w.grad, dw_ref) <= max(TOL[dtype], 1e-5)


def test_rms_norm_bad_inputs():
    with pytest.raises(ValueError, match="entries"):
        rms_norm_forward(torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        rms_norm_forward(torch.randn(3, 4), torch.randn(4, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        rms_norm_forward(torch.randn(3), torch.randn(3), 1e-6)


def hf_cos_sin(tokens, rot, base=10000.0, scale=1.0):
    inv = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.arange(tokens).float()[:, None] * inv[None] / scale
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,D,rot", [(7, 4, 2, 64, 64), (5, 3, 1, 80, 32), (1, 2, 2, 256, 256),
                                                         (0, 4, 2, 64, 64), (9, 2, 1, 6, 4)])
def test_rope(device, dtype, tokens, heads, kv_heads, D, rot):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(tokens, heads, D, generator=g).to(dtype).to(device)
    k = torch.randn(tokens, kv_heads, D, generator=g).to(dtype).to(device)
    cos, sin = hf_cos_sin(tokens, rot)
    cos, sin = cos.to(device), sin.to(device)
    q2, k2 = q.clone(), k.clone()
    rope_(q2, k2, cos, sin)
    assert rel_err(q2, reference.norm_rope.rope(q, cos, sin)) <= TOL[dtype] if tokens else q2.numel() == 0
    assert rel_err(k2, reference.norm_rope.rope(k, cos, sin)) <= TOL[dtype] if tokens else True
    if tokens:
        assert torch.equal(q2[..., rot:], q[..., rot:])  # the pass-through dims are untouched
    # inverse: the transpose (= -sin for HF's cos / sin) undoes the rotation
    rope_(q2, k2, cos, sin, inverse=True)
    if tokens:
        assert rel_err(q2, q) <= 4 * TOL[dtype] and rel_err(k2, k) <= 4 * TOL[dtype]
        q3, k3 = q.clone(), k.clone()
        rope_(q3, k3, cos, -sin)
        q4, k4 = q.clone(), k.clone()
        rope_(q4, k4, cos, sin, inverse=True)
        assert torch.equal(q3, q4) and torch.equal(k3, k4)


def test_rope_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, H, KV, D = 6, 4, 2, 32
    q, k = torch.randn(1, H, T, D), torch.randn(1, KV, T, D)
    cos, sin = hf_cos_sin(T, D, scale=8.0)
    qe, ke = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    qs, ks = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    rope_(qs, ks, cos, sin)
    assert rel_err(qs, qe[0].transpose(0, 1)) <= 1e-6 and rel_err(ks, ke[0].transpose(0, 1)) <= 1e-6


def test_rope_strided_and_autograd():
    T, H, D = 5, 4, 16
    qkv = torch.randn(T, 2 * H, D)  # q and k as strided views of one buffer
    cos, sin = hf_cos_sin(T, 8)
    q_ref, k_ref = reference.norm_rope.rope(qkv[:, :H], cos, sin), reference.norm_rope.rope(qkv[:, H:], cos, sin)
    buf = qkv.clone()
    rope_(buf[:, :H], buf[:, H:], cos, sin)
    assert rel_err(buf[:, :H], q_ref) <= 1e-6 and rel_err(buf[:, H:], k_ref) <= 1e-6

    q0 = torch.randn(T, H, D, requires_grad=True)
    k0 = torch.randn(T, 2, D, requires_grad=True)
    q, k = sloth.rope(q0 * 1.0, k0 * 1.0, cos, sin)
    (q.square().sum() + (k * 3).sum()).backward()
    qr, kr = q0.detach().clone().requires_grad_(), k0.detach().clone().requires_grad_()
    (reference.norm_rope.rope(qr, cos, sin).square().sum() + (reference.norm_rope.rope(kr, cos, sin) * 3).sum()).backward()
    assert rel_err(q0.grad, qr.grad) <= 1e-5 and rel_err(k0.grad, kr.grad) <= 1e-5


# ---- RoPE layouts: every way q / k reach the kernel, aligned (16-byte fast path) or not (fallback) ----
# (tokens, heads, kv_heads, D, rot): partial rotary, half % 8 != 0 (bf16 / fp16 fall back, fp32 does not), one
# head, odd token counts, more heads than one pass of head slots covers.
ROPE_LAYOUT_SHAPES = [(7, 4, 2, 64, 64), (5, 3, 1, 80, 32), (1, 2, 2, 256, 256), (9, 2, 1, 6, 4),
                      (333, 32, 8, 128, 128), (65, 5, 1, 96, 48), (3, 6, 6, 40, 40), (130, 1, 1, 128, 128),
                      (2, 64, 64, 16, 16), (3, 300, 2, 128, 128)]


def _rope_layout(layout, T, H, KV, D, dtype, device, g):
    """(buf, views): one buffer holding q and k, and views(b) -> (q, k) of any tensor shaped like it."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    if layout == "contiguous":  # one [T, H + KV, D] buffer: q and k its two head ranges (stride_t = (H + KV) D)
        return rnd(T, H + KV, D), lambda b: (b[:, :H], b[:, H:])
    if layout == "separate":  # q [T, H, D] and k [T, KV, D] each contiguous (as the backward passes them)
        n = T * H * D
        return rnd(n + T * KV * D), lambda b: (b[:n].view(T, H, D), b[n:].view(T, KV, D))
    if layout == "projection":  # fused qkv projection output [T, (H + 2 KV) D], v untouched
        return rnd(T, (H + 2 * KV) * D), lambda b: (b.view(T, H + 2 * KV, D)[:, :H],
                                                    b.view(T, H + 2 * KV, D)[:, H:H + KV])
    if layout == "head_major":  # [heads, T, D] seen as [T, heads, D]: strides (D, T D, 1)
        return rnd(H + KV, T, D), lambda b: (b[:H].transpose(0, 1), b[H:].transpose(0, 1))
    if layout == "offset_ptr":  # base pointer one element past 16-byte alignment: fallback
        return rnd(T * (H + KV) * D + 1), lambda b: (b[1:].view(T, H + KV, D)[:, :H], b[1:].view(T, H + KV, D)[:, H:])
    if layout == "odd_head_stride":  # stride_h = D + 1: fallback
        return rnd(T, H + KV, D + 1), lambda b: (b[:, :H, :D], b[:, H:, :D])
    if layout == "odd_token_stride":  # stride_t = (H + KV) D + 2 (4 / 8 bytes off): fallback
        return rnd(T, (H + KV) * D + 2), lambda b: (b[:, :(H + KV) * D].view(T, H + KV, D)[:, :H],
                                                    b[:, :(H + KV) * D].view(T, H + KV, D)[:, H:])
    raise ValueError(layout)


ROPE_LAYOUTS = ["contiguous", "separate", "projection", "head_major", "offset_ptr", "odd_head_stride",
                "odd_token_stride", "offset_cos"]


def check_rope_layouts(device, dtypes=DTYPES, shapes=ROPE_LAYOUT_SHAPES, layouts=ROPE_LAYOUTS):
    """rope_ (in place) and rope (into new tensors) on every (shape, layout, dtype, direction) against
    sloth.reference, with general cos / sin (halves unequal, so that mixing up cos[j] and cos[j + half] shows); the
    pass-through dims and everything of the buffer outside q / k must be bit-identical (rope: the buffer untouched).
    Returns the failures (strings)."""
    fails = []
    for (T, H, KV, D, rot) in shapes:
        for layout in layouts:
            for dtype in dtypes:
                for inverse in (False, True):
                    g = torch.Generator().manual_seed(T * 1000 + H + D + rot)
                    buf, views = _rope_layout("contiguous" if layout == "offset_cos" else layout, T, H, KV, D,
                                              dtype, device, g)
                    cs = torch.randn(2, T * rot + 1, generator=g).to(device)
                    if layout == "offset_cos":  # cos / sin one fp32 past 16-byte alignment: fallback
                        cos, sin = cs[0, 1:].view(T, rot), cs[1, 1:].view(T, rot)
                    else:
                        cos, sin = cs[0, :T * rot].view(T, rot), cs[1, :T * rot].view(T, rot)
                    mask = torch.zeros(buf.shape, dtype=torch.bool, device=device)
                    for m in views(mask):
                        m[...] = True
                    q0, k0 = views(buf)
                    q_ref = reference.norm_rope.rope(q0, cos, sin, inverse)
                    k_ref = reference.norm_rope.rope(k0, cos, sin, inverse)
                    out = buf.clone()
                    q, k = views(out)
                    rope_(q, k, cos, sin, inverse)
                    q_new, k_new = rope(*views(buf), cos, sin, inverse)  # out of place: buf only read
                    name = f"{layout} T={T} H={H} KV={KV} D={D} rot={rot} {dtype} inverse={inverse}"
                    if not (q_new.is_contiguous() and k_new.is_contiguous()):
                        fails.append(f"{name}: rope's outputs are not contiguous")
                    for what, got, want, x0 in (("q", q, q_ref, q0), ("k", k, k_ref, k0), ("rope q", q_new, q_ref, q0),
                                                ("rope k", k_new, k_ref, k0)):
                        err = rel_err(got, want)
                        if not err <= TOL[dtype]:
                            fails.append(f"{name}: {what} rel err {err:.3g} > {TOL[dtype]}")
                        if not torch.equal(got[..., rot:], x0[..., rot:]):
                            fails.append(f"{name}: {what} pass-through dims changed")
                    if not torch.equal(out[~mask], buf[~mask]):
                        fails.append(f"{name}: memory outside q / k changed")
                    if not torch.equal(views(buf)[0], q0):
                        fails.append(f"{name}: rope wrote into its input")
    return fails


@pytest.mark.parametrize("device", DEVICES)
def test_rope_layouts(device, one_thread):
    fails = check_rope_layouts(device)
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:20])


def test_rope_aliasing_is_an_error():
    """rope(q, q) would rotate the shared memory twice: an error from the op and from sloth.rope; views that
    interleave without overlapping (q, k of one fused projection) are fine, and the functional op may alias."""
    cos, sin = hf_cos_sin(5, 16)
    q = torch.randn(5, 2, 16)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.sloth.rope_(q, q, cos, sin, False)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.sloth.rope_(q[:4], q[1:], cos[:4], sin[:4], False)  # dense, partly overlapping
    with pytest.raises(ValueError, match="share memory"):
        sloth.rope(q, q, cos, sin)
    with pytest.raises(RuntimeError, match="overlap themselves"):
        torch.ops.sloth.rope_(q[:1].expand(5, 2, 16), torch.randn(5, 1, 16), cos, sin, False)
    buf = torch.randn(5, 3, 16)
    ref_q, ref_k = reference.norm_rope.rope(buf[:, :2], cos, sin), reference.norm_rope.rope(buf[:, 2:], cos, sin)
    q2, k2 = sloth.rope(buf[:, :2], buf[:, 2:], cos, sin)
    assert rel_err(q2, ref_q) <= 1e-6 and rel_err(k2, ref_k) <= 1e-6
    qa, qb = torch.ops.sloth.rope(q, q, cos, sin, False)
    assert torch.equal(qa, qb) and rel_err(qa, reference.norm_rope.rope(q, cos, sin)) <= 1e-6
