"""sloth.lora_linear against the plain-torch reference (dequantize to fp32, then matmuls): forward, dx, dA, dB."""

import pytest
import torch

import sloth
from sloth import reference

HAS_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

# Tolerances are relative to max |reference| of each output, so they do not depend on the output scale.
# fp32: the weight dequantizes bit-exactly, only the GEMM summation order differs -> 1e-5.
# bf16 / fp16: inputs are the same values; the differences are the rounding of W, t = x A^T, dy B and the
# outputs to 8 (bf16) / 11 (fp16) mantissa bits, each <= 2^-9 / 2^-12 relative, summed over K terms with
# random signs -> a few units of 2^-8 / 2^-11 of the output scale.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def make_weight(kind, out_f, in_f, dtype, device="cpu", seed=0):
    """(weight, quant_state) for kind "dense", "nf4" (sloth.nf4_quantize), "mxfp4" (sloth.mxfp4_quantize) or "bnb"
    (bitsandbytes quantize_4bit)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype).to(device)
    if kind == "dense":
        return W, None
    if kind == "nf4":
        return sloth.nf4_quantize(W, 64, compress_statistics=True)
    if kind == "mxfp4":
        blocks, scales = sloth.mxfp4_quantize(W)  # [out, in / 32, 16], [out, in / 32]
        return blocks, sloth.MXFP4State(scales)
    if kind == "nf4_fp32absmax":
        return sloth.nf4_quantize(W, 64, compress_statistics=False)
    bnbf = pytest.importorskip("bitsandbytes.functional")
    return bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")


def run_case(kind, M, in_f, out_f, r, dtype, device="cpu", bias=False, lead=()):
    g = torch.Generator().manual_seed(1)
    weight, qs = make_weight(kind, out_f, in_f, dtype, device)
    x = torch.randn(*lead, M, in_f, generator=g).to(dtype).to(device)
    A = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype).to(device)
    B = (torch.randn(out_f, r, generator=g) / r**0.5).to(dtype).to(device)
    b = torch.randn(out_f, generator=g).to(dtype).to(device) if bias else None
    s = 2.0 / r**0.5
    dy = torch.randn(*lead, M, out_f, generator=g).to(dtype).to(device)

    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    y = sloth.lora_linear(xs, weight, As, Bs, s, bias=b, quant_state=qs)
    y.backward(dy)

    xr, Ar, Br = (t.float().clone().requires_grad_() for t in (x, A, B))
    yr = reference.lora_linear.lora_linear(xr, weight, Ar, Br, s, bias=b, quant_state=qs)
    yr.backward(dy.float())

    tol = TOL[dtype]
    assert y.shape == (*lead, M, out_f) and y.dtype == dtype
    for name, got, ref in (("y", y, yr), ("dx", xs.grad, xr.grad), ("dA", As.grad, Ar.grad), ("dB", Bs.grad, Br.grad)):
        assert got.dtype == dtype, name
        e = rel_err(got, ref)
        assert e <= tol, f"{name}: relative error {e:.2e} > {tol:.0e}"


# (kind, M, in, out, r, dtype): tails in every dimension, ranks 8..128, M from generation to training sizes.
CASES = [
    ("nf4", 1, 100, 333, 8, torch.float32),
    ("nf4", 3, 333, 100, 16, torch.float32),
    ("nf4", 16, 128, 64, 128, torch.float32),
    ("nf4", 257, 100, 333, 32, torch.float32),
    ("nf4_fp32absmax", 3, 256, 96, 8, torch.float32),
    ("dense", 257, 333, 100, 64, torch.float32),
    ("dense", 1, 100, 333, 8, torch.float32),
    ("nf4", 1, 128, 333, 8, torch.bfloat16),
    ("nf4", 16, 333, 100, 64, torch.bfloat16),
    ("nf4", 257, 256, 96, 128, torch.bfloat16),
    ("nf4", 3, 100, 333, 16, torch.float16),
    ("nf4", 257, 128, 100, 32, torch.float16),
    ("dense", 16, 100, 333, 8, torch.bfloat16),
    ("dense", 257, 128, 64, 32, torch.float16),
    ("bnb", 3, 128, 333, 8, torch.float32),
    ("bnb", 257, 100, 333, 32, torch.bfloat16),
    ("bnb", 16, 256, 100, 128, torch.float16),
    ("mxfp4", 3, 96, 333, 8, torch.float32),
    ("mxfp4", 257, 128, 100, 32, torch.bfloat16),
    ("mxfp4", 16, 256, 96, 16, torch.float16),
]


@pytest.mark.parametrize("kind,M,in_f,out_f,r,dtype", CASES)
def test_lora_linear_cpu(kind, M, in_f, out_f, r, dtype):
    run_case(kind, M, in_f, out_f, r, dtype)


def test_bias_and_leading_dims():
    run_case("nf4", 5, 128, 100, 8, torch.float32, bias=True, lead=(2,))
    run_case("dense", 5, 100, 64, 8, torch.bfloat16, bias=True, lead=(3,))


def test_no_lora_and_no_grad():
    W, qs = make_weight("nf4", 64, 128, torch.float32)
    x = torch.randn(4, 128)
    y = sloth.lora_linear(x, W, None, None, quant_state=qs)
    yr = reference.lora_linear.lora_linear(x, W, None, None, 1.0, quant_state=qs)
    assert rel_err(y, yr) <= 1e-5


def test_fp32_lora_params_with_bf16_activations():
    # PEFT keeps LoRA weights in fp32 next to a bf16 base: grads must come back in fp32.
    W, qs = make_weight("nf4", 64, 128, torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    A = torch.randn(8, 128, requires_grad=True)
    B = torch.randn(64, 8, requires_grad=True)
    y = sloth.lora_linear(x, W, A, B, 0.5, quant_state=qs)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def test_workspace_reused():
    from sloth.runtime.workspace import Workspace

    W, qs = make_weight("nf4", 64, 128, torch.float32)
    x = torch.randn(32, 128)
    sloth.lora_linear(x, W, None, None, quant_state=qs)
    buf = Workspace._buffers[(torch.device("cpu"), torch.float32)]
    sloth.lora_linear(x, W, None, None, quant_state=qs)
    assert Workspace._buffers[(torch.device("cpu"), torch.float32)] is buf


def test_bad_inputs():
    W, qs = make_weight("nf4", 64, 128, torch.float32)
    x = torch.randn(4, 128)
    A, B = torch.randn(8, 128), torch.randn(64, 8)
    with pytest.raises(ValueError, match="rank mismatch"):
        sloth.lora_linear(x, W, A, torch.randn(64, 4), quant_state=qs)
    with pytest.raises(ValueError, match="last dimension"):
        sloth.lora_linear(torch.randn(4, 100), W, A, B, quant_state=qs)
    with pytest.raises(ValueError, match="lora_A must be"):
        sloth.lora_linear(x, W, torch.randn(8, 100), B, quant_state=qs)
    with pytest.raises(ValueError, match="lora_B must be"):
        sloth.lora_linear(x, W, A, torch.randn(60, 8), quant_state=qs)
    with pytest.raises(TypeError, match="dtype"):
        sloth.lora_linear(x.int(), W, A, B, quant_state=qs)
    with pytest.raises(ValueError, match="both"):
        sloth.lora_linear(x, W, A, None, quant_state=qs)
    with pytest.raises(ValueError, match="bias"):
        sloth.lora_linear(x, W, A, B, bias=torch.randn(3), quant_state=qs)
    blocks, mxs = make_weight("mxfp4", 3, 64, torch.float32)
    with pytest.raises(ValueError, match="MXFP4 weight"):  # scales of another shape
        sloth.lora_linear(x[:, :64], blocks, None, None, quant_state=sloth.MXFP4State(mxs.scales[:, :1]))
    with pytest.raises(TypeError, match="needs its quant_state"):  # packed bytes passed without their state
        sloth.lora_linear(x, W, A, B)


# ---- CUDA ----

@pytest.mark.parametrize("M", list(range(1, 17)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 1000), (96, 333), (2048, 4104)])  # (in, out): odd N, K % 128 != 0
@pytest.mark.parametrize("kind", ["nf4", "bnb", "nf4_fp32absmax"])
def test_gemv_cuda(M, dtype, shape, kind):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    in_f, out_f = shape
    W, qs = make_weight(kind, out_f, in_f, dtype, "cuda")
    x = torch.randn(M, in_f, device="cuda").to(dtype)
    A = (torch.randn(16, in_f, device="cuda") / in_f**0.5).to(dtype)
    B = (torch.randn(out_f, 16, device="cuda") / 4).to(dtype)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    from sloth.ops.qlora import NF4Args, gemv_available

    assert gemv_available(x, NF4Args.from_state(W, qs))
    y = sloth.lora_linear(x, W, A, B, 0.7, bias=bias, quant_state=qs)
    yr = reference.lora_linear.lora_linear(x, W, A, B, 0.7, bias=bias, quant_state=qs)
    # The kernel rounds W to dtype via (NF4 value in dtype) * (absmax in dtype): up to 3 roundings instead of 1.
    assert rel_err(y, yr) <= TOL[dtype] * 1.5


test_gemv_cuda = pytest.mark.cuda(test_gemv_cuda)


def check_gemv_cases(device="cuda"):
    """The fused GEMV (M <= 16) against the reference on shapes that exercise every variant's edges; returns the
    failures. (in, out): K % 128 == 0 with odd N; K > 4096 (several K chunks per warp, the last one partial);
    K % 128 == 64 and K % 64 == 32 (variants 5 / 6 do not apply: fallback); fp32 absmax (fallback); 2500 tiles of
    16 rows (19 per CTA on 132 SMs: variant 6 reduces them in several rounds of slots). LoRA and bias on / off
    cycle with M."""
    from sloth.ops.qlora import NF4Args, gemv_available

    kinds = ["nf4", "nf4_fp32absmax"]
    try:
        import bitsandbytes  # noqa: F401
        kinds.append("bnb")
    except ImportError:
        pass
    fails = []
    for kind in kinds:
        for dtype in (torch.bfloat16, torch.float16):
            for in_f, out_f in ((4096, 1000), (2048, 333), (4224, 257), (8448, 45), (4160, 100), (96, 333),
                                 (256, 40000)):
                W, qs = make_weight(kind, out_f, in_f, dtype, device)
                g = torch.Generator().manual_seed(in_f + out_f)
                A = (torch.randn(16, in_f, generator=g) / in_f**0.5).to(dtype).to(device)
                B = (torch.randn(out_f, 16, generator=g) / 4).to(dtype).to(device)
                bias = torch.randn(out_f, generator=g).to(dtype).to(device)
                for M in range(1, 17):
                    lora, with_bias = M % 2 == 1, M % 4 < 2
                    x = torch.randn(M, in_f, generator=g).to(dtype).to(device)
                    if not gemv_available(x, NF4Args.from_state(W, qs)):
                        fails.append(f"{kind} {dtype} {in_f}x{out_f} M={M}: gemv not available")
                        continue
                    args = (x, W, A if lora else None, B if lora else None, 0.7)
                    y = sloth.lora_linear(*args, bias=bias if with_bias else None, quant_state=qs)
                    yr = reference.lora_linear.lora_linear(*args, bias=bias if with_bias else None, quant_state=qs)
                    e = rel_err(y, yr)
                    if not e <= TOL[dtype] * 1.5:  # as test_gemv_cuda
                        fails.append(f"{kind} {dtype} {in_f}x{out_f} M={M} lora={lora} bias={with_bias}: {e:.3g}")
    return fails


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gemv_cases_cuda():
    """The GEMV on every kernel's edge cases (check_gemv_cases): the bulk-copy kernel where it applies (sm_90+,
    M <= 8, double-quantized absmax, K % 128 == 0), and each fallback where it does not."""
    fails = check_gemv_cases("cuda")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:30])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 8, 13])
def test_gemv_back_to_back_cuda(M):
    """Each GEMV reads the previous one's output while it may still be finishing (variant 7 is launched with
    programmatic stream serialization and waits for the previous kernel before touching memory): a chain of GEMVs
    and elementwise ops, launched back to back eagerly and from a CUDA graph, gives bitwise the outputs of the
    same chain run with a synchronize after every call (the kernel's summation order is fixed)."""
    W, qs = make_weight("nf4", 4096, 4096, torch.bfloat16, "cuda")
    x0 = torch.randn(M, 4096, device="cuda").to(torch.bfloat16)

    def chain(sync):
        x, outs = x0, []
        for i in range(12):
            x = sloth.lora_linear(x, W, None, None, quant_state=qs)
            if i % 3 == 2:
                x = x * 0.5 + x0  # a torch kernel between two GEMVs
            outs.append(x)
            if sync:
                torch.cuda.synchronize()
        return torch.stack(outs)

    expected = chain(True)
    assert torch.isfinite(expected).all()
    assert torch.equal(chain(False), expected)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(False)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind,M,in_f,out_f,r,dtype", [c for c in CASES if c[5] != torch.float32] + [
    ("nf4", 8, 4096, 1024, 32, torch.bfloat16), ("nf4", 4096, 1024, 3584, 64, torch.bfloat16),
    ("nf4", 200, 1024, 1000, 16, torch.float32)])
def test_lora_linear_cuda(kind, M, in_f, out_f, r, dtype):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    run_case(kind, M, in_f, out_f, r, dtype, device="cuda")


test_lora_linear_cuda = pytest.mark.cuda(test_lora_linear_cuda)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantize_out(device, dtype):
    from sloth.ops.qlora import NF4Args

    W, qs = make_weight("nf4", 100, 333, torch.float32, device)
    out = torch.full((100 * 333 + 5,), float("nan"), dtype=dtype, device=device)[:100 * 333]
    NF4Args.from_state(W, qs).dequantize_into(out)
    assert torch.equal(out.view(100, 333), sloth.nf4_dequantize(W, qs, ).to(dtype))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_nf4_gemv_lora_op(device, M):
    # The op itself (CPU: dequantize + fp32 GEMM; CUDA: the fused kernel), bf16 in / out.
    from sloth.ops.qlora import NF4Args

    W, qs = make_weight("nf4", 200, 256, torch.bfloat16, device)
    x = torch.randn(M, 256, device=device).to(torch.bfloat16)
    t = torch.randn(M, 8, device=device).to(torch.bfloat16)
    B = (torch.randn(200, 8, device=device) / 3).to(torch.bfloat16)
    bias = torch.randn(200, device=device).to(torch.bfloat16)
    y = sloth.ops.nf4_gemv_lora(x, NF4Args.from_state(W, qs), t, B, 0.25, bias)
    Wf = reference.lora_linear.dequantize_weight(W, qs)
    yr = x.float() @ Wf.t() + 0.25 * t.float() @ B.float().t() + bias.float()
    assert y.shape == (M, 200) and y.dtype == torch.bfloat16
    assert rel_err(y, yr) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("kind", ["nf4", "bnb"])
def test_nf4_args_made_once_per_weight(kind):
    """The checked NF4 arguments are built once per (packed weight, quant state) and rebuilt when either moves: a
    re-quantized weight (new bytes, new absmax) never runs with the old arguments."""
    from sloth.ops.qlora import NF4Args

    W, qs = make_weight(kind, 96, 128, torch.bfloat16)
    a = NF4Args.from_state(W, qs)
    assert NF4Args.from_state(W, qs) is a
    W2 = W.clone()  # the same quant state over other bytes
    b = NF4Args.from_state(W2, qs)
    assert b is not a and b.packed.data_ptr() == W2.data_ptr()
    qs.absmax = qs.absmax.clone()  # new statistics under the same bytes
    c = NF4Args.from_state(W2, qs)
    assert c is not b and c.absmax.data_ptr() == qs.absmax.data_ptr()
    x = torch.randn(5, 128).to(torch.bfloat16)
    want = reference.lora_linear.lora_linear(x, W2, None, None, 1.0, quant_state=qs)
    y = sloth.lora_linear(x, W2, None, None, quant_state=qs)
    assert torch.equal(y, sloth.lora_linear(x, W2, None, None, quant_state=qs))
    assert rel_err(y, want) <= TOL[torch.bfloat16]
