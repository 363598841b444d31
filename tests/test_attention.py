"""Attention with sinks / sliding window / softcap / GQA / packed documents against the float64 reference:
forward (out, lse) and backward (dq, dk, dv, dsinks), CPU and CUDA, on adversarial shapes; opcheck; bad input."""


import pytest
import torch

import sloth
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


# ---- Transformers: attn_implementation="sloth" on a tiny gpt-oss (sinks on every layer, window on every other) ----

def _tiny_gpt_oss(attn, seed=0):
    transformers = pytest.importorskip("transformers")
    from sloth.integrations.attention import register

    assert register()
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=6, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, attn_implementation=attn)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # initialized to zero-ish otherwise: make the sinks matter
    return model


def _loss_and_grads(model, **batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss  # with a cache, Transformers ignores packing (eager)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(batch, one_thread, eager_batch=None):
    eager, ours = _tiny_gpt_oss("eager"), _tiny_gpt_oss("sloth")
    ours.load_state_dict(eager.state_dict())
    l1, g1 = _loss_and_grads(eager, **(eager_batch or batch))
    l2, g2 = _loss_and_grads(ours, **batch)
    # fp32 everywhere: the two differ by summation order only (1e-5 of the largest gradient entry)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6), (l1, l2)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert rel_err(g2[n], g1[n]) <= 1e-4, (n, rel_err(g2[n], g1[n]))
    sinks_grad = [g for n, g in g2.items() if n.endswith("sinks")]
    assert len(sinks_grad) == 2 and all(g.abs().max() > 0 for g in sinks_grad)


def test_gpt_oss_sloth_matches_eager(one_thread):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    _compare(dict(input_ids=ids, labels=ids), one_thread)


def test_gpt_oss_sloth_matches_eager_packed(one_thread):
    """One row holding three documents (position_ids restart). Transformers' gpt-oss does not mask packed rows
    itself (its mask ignores position_ids), so the eager side gets the block-diagonal masks explicitly (causal and
    sliding-window per layer type); sloth finds the documents from position_ids."""
    lens = [9, 4, 11]
    ids = torch.randint(0, 128, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    doc = torch.cat([torch.full((n,), d) for d, n in enumerate(lens)])
    i, j = pos[0][:, None], pos[0][None, :]
    same = doc[:, None] == doc[None, :]
    masks = {}
    for kind, keep in (("full_attention", same & (j <= i)), ("sliding_attention", same & (j <= i) & (j > i - 6))):
        masks[kind] = torch.zeros(1, 1, len(doc), len(doc)).masked_fill(~keep, torch.finfo(torch.float32).min)
    batch = dict(input_ids=ids, labels=ids, position_ids=pos)
    _compare(batch, one_thread, eager_batch=dict(batch, attention_mask=masks))


def test_gpt_oss_sloth_matches_eager_padded(one_thread):
    """Right-padded rows (2-D attention mask): padding tokens are left out of the documents."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    _compare(dict(input_ids=ids, labels=labels, attention_mask=mask), one_thread)


def test_sloth_attention_fallback_matches_kernel(caplog):
    """The SDPA fallback (sink as an extra key) computes what the kernel does, and says so once."""
    import logging

    from sloth.integrations import attention as integ

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 12, 16, generator=gen)
    k, v = torch.randn(2, 2, 12, 16, generator=gen), torch.randn(2, 2, 12, 16, generator=gen)
    sinks = torch.randn(4, generator=gen)
    mod = torch.nn.Module()
    mod.is_causal = True
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    for m in (None, mask):
        for softcap in (None, 4.0):
            want, _ = integ.sloth_attention_forward(mod, q, k, v, m, scaling=0.3, sliding_window=5, s_aux=sinks,
                                                    softcap=softcap)
            got = integ._fallback(q, k, v, m, 0.0, 0.3, True, 5, sinks, softcap, None)
            assert rel_err(got, want) <= 1e-5
    integ._logged.clear()
    with caplog.at_level(logging.INFO, logger="sloth"):
        mod.training = True
        for _ in range(2):
            integ.sloth_attention_forward(mod, q, k, v, None, dropout=0.1, s_aux=sinks)
    assert sum("falls back" in r.message for r in caplog.records) == 1


def test_sloth_attention_packed_under_compile():
    """Packed documents found from position_ids under torch.compile too (the read-back is a graph break, not a
    silently unpacked batch); both match the SDPA fallback's explicit document mask."""
    from sloth.integrations import attention as integ

    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 24, 16, generator=gen)
    k, v = torch.randn(1, 2, 24, 16, generator=gen), torch.randn(1, 2, 24, 16, generator=gen)
    sinks = torch.randn(4, generator=gen)
    pos = torch.cat([torch.arange(9), torch.arange(4), torch.arange(11)])[None]
    mod = torch.nn.Module()
    mod.is_causal = True

    def f(q, k, v, sinks, pos):
        return integ.sloth_attention_forward(mod, q, k, v, None, scaling=0.25, sliding_window=5, s_aux=sinks,
                                             position_ids=pos)[0]

    want = integ._fallback(q, k, v, None, 0.0, 0.25, True, 5, sinks, None, pos)
    assert rel_err(f(q, k, v, sinks, pos), want) <= 1e-5
    assert rel_err(torch.compile(f, backend="aot_eager")(q, k, v, sinks, pos), want) <= 1e-5
