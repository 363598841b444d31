"""Attention with sinks / sliding window / softcap / GQA / packed documents against the float64 reference:
forward (out, lse) and backward (dq, dk, dv, dsinks), CPU and CUDA, on adversarial shapes; opcheck; bad input."""

import math

import pytest
import torch

import sloth
from sloth.ops.attention import attention_backward, attention_forward
from sloth.reference import attention as ref

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU")])]

# Error relative to max |reference| (float64 on the dtype-rounded inputs). fp32: the kernels compute in fp32,
# errors are sums of ~seq roundings of 2^-24 (1e-5 leaves room for the exp / tanh ulps). bf16 / fp16: the output
# is rounded to the dtype (2^-9 relative, half an ulp), and the GPU kernels also round P and dS to the dtype before
# their tensor-core products (another 2^-9 per term, random signs): 4 ulps of the dtype for out; gradients sum
# up to seq such products per element, so they get 8 ulps. dsinks is an fp32 sum of fp32 terms of the
# rounded out / dout: 8 ulps of the dtype as well.
EPS = {torch.float32: 2.0**-24 * 16, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TOL_OUT = {torch.float32: 1e-5, torch.float16: 4 * EPS[torch.float16], torch.bfloat16: 4 * EPS[torch.bfloat16]}
TOL_GRAD = {torch.float32: 1e-5, torch.float16: 8 * EPS[torch.float16], torch.bfloat16: 8 * EPS[torch.bfloat16]}


def rel_err(a, b):
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def lse_err(a, b):
    """lse: absolute error where finite (a row that sees nothing has -inf in both)."""
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin)
    return (a.double()[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def make(shape_q, shape_k, dtype, device, gen):
    q = torch.randn(shape_q, generator=gen).to(dtype)
    k = torch.randn(shape_k, generator=gen).to(dtype)
    v = torch.randn(shape_k, generator=gen).to(dtype)
    return q.to(device), k.to(device), v.to(device)


def sink_values(kind, hq, gen):
    if kind is None:
        return None
    if kind == "random":
        return torch.randn(hq, generator=gen) * 2
    return torch.full((hq,), {"very_negative": -40.0, "very_positive": 30.0}[kind])


def check_against_reference(q, k, v, *, sinks, causal, window, softcap, cu_q=None, cu_k=None, scale=None, gen):
    """Run sloth.attention forward + backward and the float64 reference; assert both within tolerance."""
    dtype, device = q.dtype, q.device
    s = None if sinks is None else sinks.to(device)
    kw = dict(causal=causal, window=window, softcap=softcap, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ss = None if s is None else s.clone().requires_grad_()
    out, lse = sloth.attention(qs, ks, vs, sinks=ss, return_lse=True, **kw)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    out.backward(dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = None if s is None else s.detach().double().requires_grad_()
    o64, l64 = ref.attention(q64, k64, v64, sinks=s64, **kw)
    o64.backward(dout.double())

    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == l64.shape
    assert rel_err(out, o64) <= TOL_OUT[dtype], rel_err(out, o64)
    # lse is fp32 math on the rounded inputs: |error| ~ |scores| * 2^-22 plus the dtype's rounding of nothing
    assert lse_err(lse, l64) <= 1e-4 * max(1.0, l64[torch.isfinite(l64)].abs().max().item() if l64.numel() else 1)
    for name, a, b in (("dq", qs.grad, q64.grad), ("dk", ks.grad, k64.grad), ("dv", vs.grad, v64.grad)):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= TOL_GRAD[dtype], (name, rel_err(a, b))
    if s is not None:
        assert ss.grad.shape == s.shape
        assert rel_err(ss.grad, s64.grad) <= TOL_GRAD[dtype], ("dsinks", rel_err(ss.grad, s64.grad))


# (batch, seq_q, seq_k, q_heads, kv_heads, head_dim, causal, window, sinks, softcap): lengths 1, 127, 129,
# windows 1, 128 and longer than the sequence, sinks very negative / very positive, GQA ratios 1, 4, 8, softcap,
# a decode-like seq_q < seq_k (bottom-right causal alignment), non-causal.
CASES = [
    (1, 1, 1, 4, 1, 64, True, None, "random", None),
    (2, 127, 127, 4, 1, 64, True, None, "random", None),
    (1, 129, 129, 8, 1, 64, True, 128, "random", None),
    (1, 129, 129, 2, 2, 128, True, 1, "very_positive", None),
    (1, 127, 127, 8, 2, 64, True, 300, "very_negative", None),
    (1, 129, 129, 4, 4, 64, True, 16, None, 5.0),
    (2, 33, 70, 4, 2, 64, True, 20, "random", None),
    (1, 70, 129, 4, 4, 64, False, None, "random", None),
    (1, 65, 65, 2, 1, 256, True, None, "random", None),
]


def case_id(c):
    b, sq, sk, hq, hkv, d, causal, window, sinks, softcap = c
    return f"b{b}-q{sq}-k{sk}-h{hq}/{hkv}-d{d}-{'c' if causal else 'nc'}-w{window}-{sinks}-cap{softcap}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_dense(device, dtype, case):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the GPU kernels take bf16 / fp16")
    b, sq, sk, hq, hkv, d, causal, window, sinks, softcap = case
    if device == "cpu" and dtype != torch.float32 and d > 64:
        pytest.skip("CPU: the bf16 / fp16 path is the fp32 one after a cast; head_dim 64 covers it")
    gen = torch.Generator().manual_seed(0)
    q, k, v = make((b, sq, hq, d), (b, sk, hkv, d), dtype, device, gen)
    check_against_reference(q, k, v, sinks=sink_values(sinks, hq, gen), causal=causal, window=window,
                            softcap=softcap, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 128, 7])
def test_attention_varlen(device, dtype, window):
    """Packed documents with an empty one, a 1-token one and ones longer than a block: nothing crosses them."""
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the GPU kernels take bf16 / fp16")
    gen = torch.Generator().manual_seed(1)
    lens = [5, 0, 129, 1, 70]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    T, hq, hkv, d = sum(lens), 8, 2, 64
    q, k, v = make((T, hq, d), (T, hkv, d), dtype, device, gen)
    check_against_reference(q, k, v, sinks=sink_values("random", hq, gen), causal=True, window=window, softcap=None,
                            cu_q=cu, cu_k=cu, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_varlen_matches_dense(device):
    """Two documents packed give the same out / lse / grads as the batch of the two (same lengths)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    q, k, v = make((2, 40, 4, 64), (2, 40, 2, 64), dtype, device, gen)
    sinks = torch.randn(4, generator=gen).to(device)
    cu = torch.tensor([0, 40, 80], dtype=torch.int32, device=device)
    o1, l1 = sloth.attention(q, k, v, sinks=sinks, window=9, return_lse=True)
    o2, l2 = sloth.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), sinks=sinks, window=9,
                             cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    assert torch.equal(o1.flatten(0, 1), o2)
    assert torch.equal(l1.permute(1, 0, 2).flatten(1), l2)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_transformers_layout(device):
    """q / k / v as Transformers holds them ([batch, heads, seq, D] transposed to [batch, seq, heads, D], not
    contiguous) give the result of contiguous inputs."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 50, 64, generator=gen).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(2, 2, 50, 64, generator=gen).to(dtype).to(device).transpose(1, 2)
    v = torch.randn(2, 2, 50, 64, generator=gen).to(dtype).to(device).transpose(1, 2)
    o1 = sloth.attention(q, k, v)
    o2 = sloth.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(o1, o2)


def test_attention_opcheck():
    gen = torch.Generator().manual_seed(4)
    q, k, v = make((1, 9, 4, 16), (1, 9, 2, 16), torch.float32, "cpu", gen)
    sinks = torch.randn(4, generator=gen)
    args = (q, k, v, sinks, None, None, 0, 0, 0.25, True, 4, 0.0)
    torch.library.opcheck(torch.ops.sloth.attention_forward, args)
    out, lse = torch.ops.sloth.attention_forward(*args)
    torch.library.opcheck(torch.ops.sloth.attention_backward,
                          (torch.randn_like(out), q, k, v, out, lse, sinks, None, None, 0, 0, 0.25, True, 4, 0.0))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    qv, kv, vv = q[0], k[0], v[0]
    vargs = (qv, kv, vv, None, cu, cu, 5, 5, 0.25, True, -1, 2.0)
    torch.library.opcheck(torch.ops.sloth.attention_forward, vargs)


def test_attention_compile():
    """torch.compile traces the op through its fake kernels (aot_eager: no C++ compiler needed)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make((1, 20, 4, 16), (1, 20, 2, 16), torch.float32, "cpu", gen)
    sinks = torch.randn(4, generator=gen).requires_grad_()
    q.requires_grad_()

    def f(q, k, v, sinks):
        return sloth.attention(q, k, v, sinks=sinks, window=5).square().sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, sinks)
    gq, gs = torch.autograd.grad(loss, (q, sinks))
    q2, s2 = q.detach().requires_grad_(), sinks.detach().requires_grad_()
    gq2, gs2 = torch.autograd.grad(f(q2, k, v, s2), (q2, s2))
    assert torch.allclose(gq, gq2) and torch.allclose(gs, gs2)


def test_attention_bad_input():
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="window must be a positive int"):
        sloth.attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="one logit per query head"):
        sloth.attention(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        sloth.attention(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(TypeError, match="dtype"):
        sloth.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="share head_dim"):
        sloth.attention(q, torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8))
    with pytest.raises(ValueError, match=r"\[tokens, heads, head_dim\] with cu_seqlens"):
        sloth.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32),
                        cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32))
    qp, kp, vp = q[0], k[0], v[0]
    with pytest.raises(ValueError, match="never decrease"):
        bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32)
        sloth.attention(qp, kp, vp, cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(ValueError, match="tokens; they must agree"):
        bad = torch.tensor([0, 5, 7], dtype=torch.int32)
        sloth.attention(qp, kp, vp, cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(TypeError, match="int32"):
        sloth.attention(qp, kp, vp, cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="both cu_seqlens_q"):
        sloth.attention(qp, kp, vp, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32))
    # direct torch.ops calls are guarded too
    with pytest.raises(RuntimeError, match="window must be > 0"):
        torch.ops.sloth.attention_forward(q, k, v, None, None, None, 0, 0, 0.25, True, 0, 0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
def test_attention_cuda_bad_input():
    q = torch.randn(1, 8, 4, 48, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        sloth.attention(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        q = torch.randn(1, 8, 4, 64, device="cuda")
        sloth.attention(q, q, q)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,window", [(64, 128), (128, None)])
def test_attention_cuda_long(dtype, d, window):
    """4097 tokens (one past a block boundary), GQA 8, sinks; few heads to keep the float64 reference small."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make((1, 4097, 8, d), (1, 4097, 1, d), dtype, "cuda", gen)
    check_against_reference(q, k, v, sinks=sink_values("random", 8, gen), causal=True, window=window, softcap=None,
                            gen=gen)
