"""MoE routing, permute, grouped GEMM (dense / NF4 / MXFP4 experts), combine, the experts' autograd and the
Transformers experts implementation "sloth", against the float64 per-expert loop of sloth.reference.moe."""

import pytest
import torch

from sloth.nn.moe import MoEExpertsSpec, moe_experts, moe_route
from sloth.ops import moe as ops
from sloth.ops.moe import MoEWeight
from sloth.reference import moe as ref

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU")])]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Relative to max |reference| of the tensor. Kernels compute in fp32 from the same rounded inputs (4-bit
# weights decoded and rounded to the activations' dtype, as the reference's round_to), so fp32 differs by
# summation order only; 16-bit outputs carry one final rounding (2^-8 bf16) plus the rounding of the
# intermediate activations that feed the second GEMM and the backward GEMMs (a few bf16 ulps relative to the
# tensor's max), hence 3e-2 for bf16 and 1e-2 for fp16.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def make_weight(fmt, w):
    """MoEWeight of a float [E, A, B] stack in fmt."""
    if fmt == "dense":
        return MoEWeight.dense(w)
    if fmt == "nf4":
        return MoEWeight.quantize_nf4(w, 64, compress_statistics=False)
    if fmt == "nf4dq":
        return MoEWeight.quantize_nf4(w, 64, compress_statistics=True)
    return MoEWeight.quantize_mxfp4(w)


def routing(T, E, k, case, device, gen):
    """ids [T, k], weights [T, k] for a routing pattern."""
    if case == "all_one":
        ids = torch.stack([torch.full((T,), (E - 1 + j) % E) for j in range(k)], 1)
    elif case == "sparse":  # most experts empty
        ids = torch.stack([torch.full((T,), 2 * j % E) for j in range(k)], 1)
        ids[::3, 0] = 5 % E
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    return ids.to(device), w.to(device)


# ---------------------------------------------------------------- routing and permute

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (7, 8, 1), (65, 16, 4), (33, 8, 8)])
@pytest.mark.parametrize("kind,renorm", [(0, False), (0, True), (1, False)])
def test_route(device, T, E, k, kind, renorm):
    g = torch.Generator().manual_seed(T * E + k)
    logits = torch.randn(T, E, generator=g)
    logits[0, 1::2] = logits[0, 0]  # ties: the lower index wins
    logits = logits.to(device)
    w, ids = ops.moe_route(logits, k, kind, renorm)
    rw, rids = ref.route(logits.double(), k, kind, renorm)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), rids.cpu())
    assert (w.double() - rw).abs().max().item() < 1e-6


@pytest.mark.parametrize("kind,renorm", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", False)])
def test_route_grad(kind, renorm):
    logits = torch.randn(9, 8)
    lg = logits.clone().requires_grad_(True)
    w, ids = moe_route(lg, 3, kind, renorm)
    dw = torch.randn_like(w)
    (w * dw).sum().backward()
    dw = dw.double()
    lr = logits.double().requires_grad_(True)
    rw, rids = ref.route(lr, 3, 0 if kind == "softmax_topk" else 1, renorm)
    (rw * dw).sum().backward()
    assert torch.equal(ids, rids)
    assert (lg.grad.double() - lr.grad).abs().max().item() < 1e-6  # fp32 math against fp64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["random", "all_one", "sparse"])
@pytest.mark.parametrize("T,k", [(1, 1), (7, 2), (65, 4)])
def test_permute(device, case, T, k):
    E = 8
    ids, _ = routing(T, E, k, case, device, torch.Generator().manual_seed(1))
    ss, sp, off = ops.moe_permute(ids, E)
    rss, rsp, roff = ref.permute(ids.cpu(), E)
    assert torch.equal(ss.cpu().long(), rss) and torch.equal(sp.cpu().long(), rsp) and torch.equal(off.cpu().long(), roff)


# ---------------------------------------------------------------- grouped GEMM

def _gemm_case(fmt, dtype, trans, glu, bias, lora, T, k, case, device, E=8, N=64, K=96):
    g = torch.Generator().manual_seed(hash((fmt, str(dtype), trans, glu, bias, lora, T, k, case)) % 2**31)
    ids, _ = routing(T, E, k, case, "cpu", g)
    x = torch.randn(T, K, generator=g).to(dtype)
    # storage [E, A, B]: non-trans [E, N, K]; trans [E, K, N]; 4-bit formats quantize along B
    w = torch.randn((E, K, N) if trans else (E, N, K), generator=g) * 0.2
    mw = make_weight(fmt, w.to(dtype) if fmt == "dense" else w)
    b = torch.randn(E, N, generator=g).to(dtype) if bias else None
    r = 4
    ss, sp, off = ops.moe_permute(ids, E)
    rows = torch.div(ss, k, rounding_mode="floor")
    lt = (torch.randn(T * k, r, generator=g) * 0.5).to(dtype) if lora else None
    lB = (torch.randn(E, N, r, generator=g) * 0.5).to(dtype) if lora else None
    wd = mw.dequantize(torch.float64) if fmt == "dense" else ref.dequantize_weight(
        "nf4" if fmt.startswith("nf4") else fmt, mw.data, mw.shape, torch.float64, absmax=mw.scale, scales=mw.scale,
        code2=mw.code2, absmax2=mw.absmax2, offset=mw.offset, blocksize=mw.blocksize, round_to=dtype)
    # reference, float64: per-expert loop, LoRA from the given lora_t
    xs = x.double()[rows.long()]
    pre = torch.zeros(T * k, N, dtype=torch.float64)
    for e in range(E):
        lo, hi = int(off[e]), int(off[e + 1])
        we = wd[e] if trans else wd[e].t()
        pre[lo:hi] = xs[lo:hi] @ we
        if bias:
            pre[lo:hi] += b[e].double()
        if lora:
            pre[lo:hi] += 0.5 * lt[lo:hi].double() @ lB[e].double().t()
    expect = ref.glu(pre, glu)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    out, p = ops.moe_grouped_gemm(x.to(device), off.to(device), mw.to(device), rows=rows.to(device), trans=trans,
                                  bias=dev(b), lora_t=dev(lt), lora_B=dev(lB), scaling=0.5, glu=glu, return_pre=True)
    return out, p, expect, pre


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["dense", "nf4", "nf4dq", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [False, True])
def test_grouped_gemm_formats(device, fmt, dtype, trans):
    out, pre, expect, rpre = _gemm_case(fmt, dtype, trans, 0, True, True, 7, 2, "random", device)
    assert out.dtype == dtype and out.shape == expect.shape and pre.shape[0] == 0
    assert rel_err(out, expect) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("glu", [1, 2, 3, 4])
@pytest.mark.parametrize("fmt,dtype", [("dense", torch.float32), ("mxfp4", torch.bfloat16), ("nf4dq", torch.float16)])
def test_grouped_gemm_glu(device, glu, fmt, dtype):
    out, pre, expect, rpre = _gemm_case(fmt, dtype, False, glu, glu >= 3, False, 7, 2, "random", device)
    assert out.shape == expect.shape and pre.shape == rpre.shape
    assert rel_err(pre, rpre) <= TOL[dtype] and rel_err(out, expect) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,T,k", [("all_one", 65, 1), ("sparse", 1, 2), ("sparse", 7, 2), ("random", 65, 4)])
def test_grouped_gemm_token_patterns(device, case, T, k):
    out, _, expect, _ = _gemm_case("mxfp4", torch.bfloat16, False, 3, True, True, T, k, case, device)
    assert rel_err(out, expect) <= TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
@pytest.mark.parametrize("fmt", ["dense", "nf4dq", "mxfp4"])
@pytest.mark.parametrize("trans,glu,dtype", [(False, 0, torch.bfloat16), (True, 0, torch.bfloat16),
                                             (False, 1, torch.bfloat16), (False, 3, torch.bfloat16),
                                             (False, 2, torch.float16), (True, 0, torch.float16)])
def test_grouped_gemm_cuda_large(fmt, trans, glu, dtype):
    """8193 tokens through the tensor-core path (tiles of 128 rows, partial last tiles, an empty expert)."""
    out, pre, expect, rpre = _gemm_case(fmt, dtype, trans, glu, True, True, 8193, 2, "sparse", "cuda", E=8,
                                        N=256, K=224 if fmt == "mxfp4" else 200)
    assert rel_err(out, expect) <= TOL[dtype]
    if glu:
        assert rel_err(pre, rpre) <= TOL[dtype]


# ---------------------------------------------------------------- combine, GLU backward

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_and_backward(device, dtype):
    T, k, E, H = 7, 3, 5, 40
    ids, w = routing(T, E, k, "random", device, torch.Generator().manual_seed(3))
    ss, sp, off = ops.moe_permute(ids, E)
    y = torch.randn(T * k, H, device=device).to(dtype)
    out = ops.moe_combine(y, sp, w, k)
    assert rel_err(out, ref.combine(y.double(), sp.long(), w.double(), k)) <= TOL[dtype]
    dout = torch.randn(T, H, device=device).to(dtype)
    dy, dw = ops.moe_combine_backward(dout, y, ss, sp, w)
    yy = y.double().requires_grad_(True)
    ww = w.double().requires_grad_(True)
    (ref.combine(yy, sp.long(), ww, k) * dout.double()).sum().backward()
    assert rel_err(dy, yy.grad) <= TOL[dtype] and rel_err(dw, ww.grad) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("glu", [1, 2, 3, 4])
def test_glu_backward(device, glu):
    pre = (torch.randn(9, 20) * 6).to(device)  # crosses the clamps at +-7
    dh = torch.randn(9, 10, device=device)
    p = pre.double().requires_grad_(True)
    (ref.glu(p, glu) * dh.double()).sum().backward()
    assert rel_err(ops.moe_glu_backward(dh, pre, glu), p.grad) <= 1e-5


# ---------------------------------------------------------------- experts forward / backward

def _spec_and_ref(fmt, dtype, trainable, lora, gptoss, device, E, H=64, I=32, g=None):
    """(spec, reference kwargs, leaf tensors) of one experts layer."""
    gu = torch.randn(E, 2 * I, H, generator=g) * 0.15  # [E, out, in]
    dn = torch.randn(E, H, I, generator=g) * 0.15
    leaves = {}
    if fmt == "dense":
        if gptoss:  # gpt-oss stores [E, in, out]
            gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
        gu_t, dn_t = gu.to(dtype).to(device).requires_grad_(trainable), dn.to(dtype).to(device).requires_grad_(trainable)
        leaves.update(gate_up=gu_t, down=dn_t)
        gw, dw = MoEWeight.dense(gu_t), MoEWeight.dense(dn_t)
        trans = gptoss
        gr, dr = gu_t, dn_t
    else:
        gw, dw = make_weight(fmt, gu).to(device), make_weight(fmt, dn).to(device)
        trans = False
        gr = ref.dequantize_weight("nf4" if fmt.startswith("nf4") else fmt, gw.data.cpu(), gw.shape, torch.float64,
                                   absmax=None if gw.scale is None else gw.scale.cpu(),
                                   scales=None if gw.scale is None else gw.scale.cpu(),
                                   code2=None if gw.code2 is None else gw.code2.cpu(),
                                   absmax2=None if gw.absmax2 is None else gw.absmax2.cpu(),
                                   offset=None if gw.offset is None else gw.offset.cpu(), blocksize=64, round_to=dtype)
        dr = ref.dequantize_weight("nf4" if fmt.startswith("nf4") else fmt, dw.data.cpu(), dw.shape, torch.float64,
                                   absmax=None if dw.scale is None else dw.scale.cpu(),
                                   scales=None if dw.scale is None else dw.scale.cpu(),
                                   code2=None if dw.code2 is None else dw.code2.cpu(),
                                   absmax2=None if dw.absmax2 is None else dw.absmax2.cpu(),
                                   offset=None if dw.offset is None else dw.offset.cpu(), blocksize=64, round_to=dtype)
    spec = MoEExpertsSpec(gate_up=gw, down=dw, gate_up_trans=trans, down_trans=trans,
                          glu=3 if gptoss else 1, scaling=0.7)
    if gptoss:
        spec.gate_up_bias = (torch.randn(E, 2 * I, generator=g) * 0.3).to(dtype).to(device).requires_grad_(True)
        spec.down_bias = (torch.randn(E, H, generator=g) * 0.3).to(dtype).to(device).requires_grad_(True)
        leaves.update(gate_up_bias=spec.gate_up_bias, down_bias=spec.down_bias)
    if lora:
        r = 4
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype).to(device).requires_grad_(True)  # noqa: E731
        spec.lora = {"gate_up": (mk(E, r, H), mk(E, 2 * I, r)), "down": (mk(E, r, I), mk(E, H, r))}
        for p, (A, B) in spec.lora.items():
            leaves[f"{p}_A"], leaves[f"{p}_B"] = A, B
    return spec, gr, dr, leaves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,dtype,trainable,lora,gptoss", [
    ("dense", torch.float32, True, False, False),
    ("dense", torch.bfloat16, True, True, False),
    ("dense", torch.float32, True, True, True),
    ("dense", torch.float16, True, False, True),
    ("nf4dq", torch.bfloat16, False, True, False),
    ("nf4", torch.float32, False, True, True),
    ("mxfp4", torch.bfloat16, False, True, True),
    ("mxfp4", torch.float32, False, True, False),
])
@pytest.mark.parametrize("T,k,case", [(1, 2, "random"), (7, 1, "random"), (65, 4, "random"), (65, 2, "all_one"),
                                      (7, 2, "sparse")])
def test_experts_forward_backward(device, fmt, dtype, trainable, lora, gptoss, T, k, case):
    E, H = 8, 64
    g = torch.Generator().manual_seed(T * 100 + k)
    ids, w = routing(T, E, k, case, "cpu", g)
    x = torch.randn(T, H, generator=g)
    spec, gr, dr, leaves = _spec_and_ref(fmt, dtype, trainable, lora, gptoss, device, E, g=g)
    xs = x.to(dtype).to(device).requires_grad_(True)
    ws = w.to(device).requires_grad_(True)
    out = moe_experts(xs, ids.to(device), ws, spec)
    dout = torch.randn(T, H, generator=g)
    out.backward(dout.to(dtype).to(device))

    # float64 oracle with autograd
    d = lambda t: t.detach().cpu().double().requires_grad_(True)  # noqa: E731
    xr, wr = d(xs), d(ws)
    gr64 = d(gr) if fmt == "dense" else gr.double()
    dr64 = d(dr) if fmt == "dense" else dr.double()
    lora_r = {p: (d(A), d(B)) for p, (A, B) in spec.lora.items()}
    gb = d(spec.gate_up_bias) if spec.gate_up_bias is not None else None
    db = d(spec.down_bias) if spec.down_bias is not None else None
    expect = ref.experts_forward(xr, ids, wr, gr64, dr64, gate_up_trans=spec.gate_up_trans,
                                 down_trans=spec.down_trans, gate_up_bias=gb, down_bias=db, glu_kind=spec.glu,
                                 lora=lora_r, scaling=spec.scaling)
    (expect * dout.double()).sum().backward()
    tol = TOL[dtype]
    assert out.dtype == dtype and rel_err(out, expect) <= tol
    assert rel_err(xs.grad, xr.grad) <= tol
    assert rel_err(ws.grad, wr.grad) <= tol  # router gradient
    if fmt == "dense":
        assert rel_err(leaves["gate_up"].grad, gr64.grad) <= tol and rel_err(leaves["down"].grad, dr64.grad) <= tol
    if gptoss:
        assert rel_err(spec.gate_up_bias.grad, gb.grad) <= tol and rel_err(spec.down_bias.grad, db.grad) <= tol
    for p, (A, B) in spec.lora.items():
        assert rel_err(A.grad, lora_r[p][0].grad) <= tol, p
        assert rel_err(B.grad, lora_r[p][1].grad) <= tol, p


# ---------------------------------------------------------------- opcheck and bad input

def test_bad_inputs():
    E, K, N = 4, 32, 16
    ids = torch.randint(0, E, (5, 2))
    ss, sp, off = ops.moe_permute(ids, E)
    x = torch.randn(10, K)
    w = MoEWeight.dense(torch.randn(E, N, K))
    with pytest.raises(RuntimeError, match="outside"):
        ops.moe_permute(torch.tensor([[0, 4]]), E)  # expert id out of range
    with pytest.raises(ValueError, match="offsets has"):
        ops.moe_grouped_gemm(x, off[:-1].contiguous(), w)
    with pytest.raises(RuntimeError, match="offsets must run from 0"):
        ops.moe_grouped_gemm(x[:7], off, w)  # offsets do not match the rows
    with pytest.raises(ValueError, match="features"):
        ops.moe_grouped_gemm(torch.randn(10, K + 1), off, w)
    with pytest.raises(TypeError, match="offsets must have dtype int32"):
        ops.moe_grouped_gemm(x, off.long(), w)
    q = MoEWeight.quantize_mxfp4(torch.randn(E, N, K))
    bad = MoEWeight("mxfp4", q.data, q.shape, scale=q.scale[:, :-1])
    with pytest.raises(RuntimeError, match="MXFP4 scales"):
        ops.moe_grouped_gemm(x, off, bad)
    n = MoEWeight.quantize_nf4(torch.randn(E, N, K), 64, compress_statistics=False)
    with pytest.raises(RuntimeError, match="absmax has"):
        ops.moe_grouped_gemm(x, off, MoEWeight("nf4", n.data, n.shape, scale=n.scale, blocksize=32))
    with pytest.raises(RuntimeError, match="blocksize"):
        ops.moe_grouped_gemm(x, off, MoEWeight("nf4", n.data, n.shape, scale=n.scale, blocksize=48))
    with pytest.raises(TypeError, match="dtype"):
        ops.moe_grouped_gemm(x.to(torch.int32), off, w)
    with pytest.raises(ValueError, match="GLU"):
        ops.moe_grouped_gemm(x, off, w, glu="geglu")


# ---------------------------------------------------------------- Transformers models

def _tiny_model(family):
    transformers = pytest.importorskip("transformers")
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=64)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.GptOssConfig(
            vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
        cls = transformers.GptOssForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():  # random experts and biases (the init leaves some at zero)
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or "gate" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_transformers_experts_implementation(family, one_thread):
    from sloth.integrations import moe as integ

    assert integ.register()
    model = _tiny_model(family)
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert experts and all(integ.is_supported(m)[0] for m in experts)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))

    def run(impl):
        model.set_experts_implementation(impl)
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits0, grads0 = run("eager")
    logits1, grads1 = run("sloth")
    # fp32 throughout: only summation order differs
    assert rel_err(logits1, logits0) <= 1e-5
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert rel_err(grads1[n], grads0[n]) <= 1e-4, n


@pytest.mark.parametrize("family,fmt", [("qwen3_moe", "nf4"), ("gpt_oss", "mxfp4")])
def test_transformers_quantized_experts_lora(family, fmt, one_thread):
    """4-bit experts + per-expert LoRA: the model's loss and LoRA gradients match the same model with the
    dequantized experts as dense parameters and the same LoRA computed by the reference."""
    from sloth.integrations import moe as integ

    integ.register()
    model = _tiny_model(family)
    model.set_experts_implementation("sloth")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    for m in model.modules():
        if type(m).__name__.endswith("Experts"):
            integ.quantize_experts_(m, fmt, blocksize=64)
            integ.add_lora_(m, r=4, lora_alpha=8, dtype=torch.float32)
            with torch.no_grad():
                m.sloth_lora_gate_up_B.normal_(0, 0.1)
                m.sloth_lora_down_B.normal_(0, 0.1)
            assert integ.is_supported(m)[0] and not hasattr(m, "gate_up_proj")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "sloth_lora" in n}
    assert len(grads) == 8 and all(g.abs().sum() > 0 for g in grads.values())

    # the same computation with each experts module replaced by the float64 per-expert loop
    originals = {}
    for m in model.modules():
        if type(m).__name__.endswith("Experts"):
            spec = integ.experts_spec(m)

            def fwd(hs, idx, wts, spec=spec):
                deq = lambda w: w.dequantize(torch.float64)  # noqa: E731
                lora = {p: (A.double(), B.double()) for p, (A, B) in spec.lora.items()}
                return ref.experts_forward(hs.double(), idx, wts.double(), deq(spec.gate_up), deq(spec.down),
                                           gate_up_bias=None if spec.gate_up_bias is None else spec.gate_up_bias.double(),
                                           down_bias=None if spec.down_bias is None else spec.down_bias.double(),
                                           glu_kind=spec.glu, lora=lora, scaling=spec.scaling).float()
            originals[m] = m.forward
            m.forward = fwd
    model.zero_grad()
    loss_ref = model(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for n, p in model.named_parameters():
        if "sloth_lora" in n:
            assert rel_err(grads[n], p.grad) <= 1e-4, n


def test_peft_target_parameters_lora(one_thread):
    """PEFT LoRA on the 3-D expert parameters (target_parameters): PEFT hands the experts the merged weight
    W + s B A, which the dense path differentiates; loss and LoRA gradients match the eager experts."""
    peft = pytest.importorskip("peft")
    from sloth.integrations import moe as integ

    integ.register()
    model = _tiny_model("qwen3_moe")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))

    def run(impl):
        pm.base_model.model.set_experts_implementation(impl)
        pm.zero_grad()
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    l0, g0 = run("eager")
    l1, g1 = run("sloth")
    assert abs(l1 - l0) <= 1e-5 * abs(l0) and g0.keys() == g1.keys() and len(g0) == 8
    for n in g0:
        assert rel_err(g1[n], g0[n]) <= 1e-4, n
