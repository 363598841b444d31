"""Property-based tests (hypothesis) of every public op over shapes, zero sizes included, and dtypes, against
sloth.reference (CPU). Few examples per property (CI has 2 cores); the example-based tests of each family cover
the adversarial shapes in depth. Tolerances: relative to max |reference|, the final rounding of the output dtype
plus fp32 reduction-order noise (as in the per-family tests)."""

import pytest
import torch

import sloth
from sloth import reference as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(a, b):
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@SETTINGS
@given(shape=st.lists(st.integers(0, 70), min_size=1, max_size=3), dtype=DTYPES,
       blocksize=st.sampled_from([32, 64, 256]), nested=st.booleans(), seed=st.integers(0, 9))
def test_nf4_roundtrip(shape, dtype, blocksize, nested, seed):
    x = randn(shape, dtype, seed)
    packed, state = sloth.nf4_quantize(x, blocksize, compress_statistics=nested)
    want = ref.nf4.nf4_quantize(x, blocksize, compress_statistics=nested)
    assert torch.equal(packed, want["packed"])
    y = sloth.nf4_dequantize(packed, state)
    assert y.shape == x.shape and y.dtype == dtype
    kw = {k: want[k] for k in ("code2", "absmax2", "offset") if k in want}
    y_ref = ref.nf4.nf4_dequantize(want["packed"], want["absmax"], x.shape, blocksize, dtype, **kw)
    assert torch.equal(y, y_ref)


@SETTINGS
@given(lead=st.lists(st.integers(0, 5), max_size=2), groups=st.integers(0, 4), dtype=DTYPES,
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 9))
def test_mxfp4_roundtrip(lead, groups, dtype, scale, seed):
    x = (randn([*lead, 32 * groups], torch.float32, seed) * scale).to(dtype)
    blocks, scales = sloth.mxfp4_quantize(x)
    rb, rs = ref.mxfp4.mxfp4_quantize(x)
    assert torch.equal(blocks, rb) and torch.equal(scales, rs)
    y = sloth.mxfp4_dequantize(blocks, scales, dtype)
    assert y.shape == x.shape and torch.equal(y, ref.mxfp4.mxfp4_dequantize(rb, rs, dtype))


@SETTINGS
@given(lead=st.lists(st.integers(0, 6), min_size=1, max_size=2), H=st.integers(0, 100), dtype=DTYPES,
       gemma=st.booleans(), seed=st.integers(0, 9))
def test_rms_norm(lead, H, dtype, gemma, seed):
    offset, cast = (1.0, False) if gemma else (0.0, True)
    x = randn([*lead, H], dtype, seed).requires_grad_()
    w = (1 + 0.3 * randn([H], torch.float32, seed + 1)).to(dtype).requires_grad_()
    y = sloth.rms_norm(x, w, 1e-6, offset, cast)
    assert y.shape == x.shape and y.dtype == dtype
    x2 = x.detach().reshape(-1, H) if H else x.detach().reshape(0, 0)
    if x2.numel():
        y_ref, _ = ref.norm_rope.rms_norm_forward(x2, w.detach(), 1e-6, offset, cast)
        assert rel_err(y.detach().reshape(-1, H), y_ref) <= TOL[dtype]
    dy = randn(y.shape, dtype, seed + 2)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert dx.shape == x.shape and dw.shape == w.shape
    if x2.numel():
        dx_ref, dw_ref = ref.norm_rope.rms_norm_backward(dy.reshape(-1, H), x2, w.detach(), 1e-6, offset, cast)
        assert rel_err(dx.reshape(-1, H), dx_ref) <= 2 * TOL[dtype]
        assert rel_err(dw, dw_ref) <= 2 * TOL[dtype]
    elif H:
        assert not dw.any()  # no rows: no gradient


@SETTINGS
@given(tokens=st.integers(0, 9), heads=st.integers(1, 4), kv=st.integers(0, 2), half=st.integers(1, 8),
       extra=st.sampled_from([0, 2]), dtype=DTYPES, seed=st.integers(0, 9))
def test_rope(tokens, heads, kv, half, extra, dtype, seed):
    D, rot = 2 * half + extra, 2 * half
    q, k = randn([tokens, heads, D], dtype, seed), randn([tokens, kv, D], dtype, seed + 1)
    cos, sin = randn([tokens, rot], torch.float32, seed + 2), randn([tokens, rot], torch.float32, seed + 3)
    for inverse in (False, True):
        q_ref, k_ref = ref.norm_rope.rope(q, cos, sin, inverse), ref.norm_rope.rope(k, cos, sin, inverse)
        qo, ko = torch.ops.sloth.rope(q, k, cos, sin, inverse)  # out of place
        q2, k2 = q.clone(), k.clone()
        sloth.ops.rope_(q2, k2, cos, sin, inverse)  # in place
        for got in (qo, q2):
            assert rel_err(got, q_ref) <= TOL[dtype]
        for got in (ko, k2):
            assert rel_err(got, k_ref) <= TOL[dtype]
    qg = q.clone().requires_grad_()
    (out,) = [sloth.rope(qg * 1, k.clone(), cos, sin)[0]]
    g = torch.autograd.grad(out, qg, torch.ones_like(out))[0]
    qr = q.clone().float().requires_grad_()
    g_ref = torch.autograd.grad(ref.norm_rope.rope(qr, cos, sin), qr, torch.ones_like(qr))[0]
    assert rel_err(g, g_ref) <= 4 * TOL[dtype]


@SETTINGS
@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=3), kind=st.sampled_from(["swiglu", "geglu_tanh", "geglu"]),
       dtype=DTYPES, seed=st.integers(0, 9))
def test_glu(shape, kind, dtype, seed):
    k = sloth.ops.GLU_KINDS[kind]
    gate, up = randn(shape, dtype, seed).requires_grad_(), randn(shape, dtype, seed + 1).requires_grad_()
    h = sloth.nn.glu(gate, up, kind)
    assert h.shape == gate.shape and h.dtype == dtype
    assert rel_err(h, ref.glu.glu_forward(gate.detach(), up.detach(), k)) <= TOL[dtype]
    dh = randn(shape, dtype, seed + 2)
    dg, du = torch.autograd.grad(h, (gate, up), dh)
    dg_ref, du_ref = ref.glu.glu_backward(dh, gate.detach(), up.detach(), k)
    assert rel_err(dg, dg_ref) <= 2 * TOL[dtype] and rel_err(du, du_ref) <= 2 * TOL[dtype]


@SETTINGS
@given(tokens=st.integers(0, 12), H=st.integers(0, 24), V=st.integers(1, 40), w_grad=st.booleans(),
       softcap=st.sampled_from([None, 5.0]), ignore=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 9))
def test_linear_cross_entropy(tokens, H, V, w_grad, softcap, ignore, dtype, seed):
    hidden = (randn([tokens, H], torch.float32, seed) / max(H, 1) ** 0.25).to(dtype).requires_grad_()
    weight = (randn([V, H], torch.float32, seed + 1) / max(H, 1) ** 0.25).to(dtype).requires_grad_(w_grad)
    labels = torch.randint(0, V, (tokens,), generator=torch.Generator().manual_seed(seed))
    if ignore and tokens:
        labels[::2] = -100
    loss = sloth.linear_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_size=5)
    want = ref.cross_entropy.linear_cross_entropy(hidden.float(), weight.float(), labels, softcap=softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    inputs = [hidden] + ([weight] if w_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    hf, wf = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_(w_grad)
    grads_ref = torch.autograd.grad(ref.cross_entropy.linear_cross_entropy(hf, wf, labels, softcap=softcap),
                                    [hf] + ([wf] if w_grad else []), allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape and rel_err(g, g_ref) <= 10 * tol


@SETTINGS
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=2), in_f=st.integers(0, 40), out_f=st.integers(1, 24),
       r=st.integers(1, 4), bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 9))
def test_lora_linear(lead, in_f, out_f, r, bias, dtype, seed):
    x = randn([*lead, in_f], dtype, seed).requires_grad_()
    W = randn([out_f, in_f], dtype, seed + 1)
    A = (0.3 * randn([r, in_f], torch.float32, seed + 2)).to(dtype).requires_grad_()
    B = (0.3 * randn([out_f, r], torch.float32, seed + 3)).to(dtype).requires_grad_()
    b = randn([out_f], dtype, seed + 4).requires_grad_() if bias else None
    y = sloth.lora_linear(x, W, A, B, 0.5, bias=b)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    inputs = [x, A, B] + ([b] if bias else [])
    y_ref = ref.lora_linear.lora_linear(*[t.detach().float().requires_grad_() if t is not None and t.requires_grad
                                          else t for t in (x, W, A, B)], 0.5)
    if y.numel():
        assert rel_err(y, y_ref + (b.float() if bias else 0)) <= 4 * TOL[dtype]
    dy = randn(y.shape, dtype, seed + 5)
    grads = torch.autograd.grad(y, inputs, dy)
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape and torch.isfinite(g.float()).all()
    if y.numel() == 0 or in_f == 0:
        assert not grads[1].any() and (not bias or y.numel() or not grads[-1].any())
