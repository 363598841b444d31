"""Fused GLU activation (SwiGLU / GeGLU): forward and in-place backward against the fp32 reference."""

import pytest
import torch

import sloth
from sloth import reference
from sloth.ops import glu_backward_, glu_forward

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU")])]

# Relative to max |reference|: the kernel computes in fp32 from the same rounded inputs, so the only
# difference is the final rounding to dtype (2^-8 bf16, 2^-11 fp16) plus ulp-level fp32 noise in
# exp / tanh / erf (fp32: 1e-6).
TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7,), (3, 333), (64, 1024), (5, 17, 9)])
def test_glu_forward_backward(device, dtype, kind, shape):
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(shape, generator=g)).to(dtype).to(device)
    up = torch.randn(shape, generator=g).to(dtype).to(device)
    dh = torch.randn(shape, generator=g).to(dtype).to(device)
    h = glu_forward(gate, up, kind)
    assert h.dtype == dtype and h.shape == gate.shape
    assert rel_err(h, reference.glu.glu_forward(gate, up, kind)) <= TOL[dtype]
    dg_ref, du_ref = reference.glu.glu_backward(dh, gate, up, kind)
    g2, u2 = gate.clone(), up.clone()
    glu_backward_(dh, g2, u2, kind)
    assert rel_err(g2, dg_ref) <= TOL[dtype] * 2  # d_gate has one more product before rounding
    assert rel_err(u2, du_ref) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["swiglu", "geglu_tanh", "geglu"])
def test_glu_autograd(device, kind):
    gate = torch.randn(4, 100, device=device, requires_grad=True)
    up = torch.randn(4, 100, device=device, requires_grad=True)
    h = sloth.glu(gate, up, kind)
    h.backward(torch.ones_like(h))
    k = sloth.ops.GLU_KINDS[kind]
    dg, du = reference.glu.glu_backward(torch.ones_like(h), gate, up, k)
    assert rel_err(gate.grad, dg) <= 1e-5 and rel_err(up.grad, du) <= 1e-5
    assert rel_err(h, reference.glu.glu_forward(gate, up, k)) <= 1e-6


def test_glu_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        glu_forward(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        glu_forward(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown GLU kind"):
        glu_forward(torch.randn(3, 4), torch.randn(3, 4), "relu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["swiglu", "geglu_tanh"])
def test_lora_mlp(device, kind, monkeypatch):
    from sloth.nn.lora_mlp import LoraProj

    torch.manual_seed(0)
    hid, inter, r = 64, 160, 8
    projs, ref_parts = [], []
    for o, i in ((inter, hid), (inter, hid), (hid, inter)):
        W = (torch.randn(o, i) / i**0.5).to(device)
        packed, qs = sloth.nf4_quantize(W)
        A = (torch.randn(r, i, device=device) / i**0.5).requires_grad_()
        B = (torch.randn(o, r, device=device) / r**0.5).requires_grad_()
        projs.append(LoraProj(packed, A, B, 0.5, None, qs))
        ref_parts.append((reference.lora_linear.dequantize_weight(packed, qs), A, B))
    x = torch.randn(2, 5, hid, device=device, requires_grad=True)
    from sloth.nn import lora_group

    groups = []
    apply = lora_group.LoraGroupFunction.apply
    monkeypatch.setattr(lora_group.LoraGroupFunction, "apply", lambda *a: groups.append(len(a)) or apply(*a))
    y = sloth.lora_mlp(x, *projs, kind=kind)
    assert groups == [3 + 2 * 3]  # gate and up as one group: x, ws, scalings, then (A, B, bias) for each
    y.square().sum().backward()
    got = [x.grad] + [p.lora_A.grad for p in projs] + [p.lora_B.grad for p in projs]

    xr = x.detach().clone().requires_grad_()
    refs = [(W, A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()) for W, A, B in ref_parts]

    def lin(t, W, A, B):
        return t @ W.t() + 0.5 * (t @ A.t()) @ B.t()

    k = sloth.ops.GLU_KINDS[kind]
    h = reference.glu.act(lin(xr, *refs[0]), k) * lin(xr, *refs[1])
    yr = lin(h, *refs[2])
    yr.square().sum().backward()
    want = [xr.grad] + [p[1].grad for p in refs] + [p[2].grad for p in refs]
    assert rel_err(y, yr) <= 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4  # fp32; grads pass through 3 GEMM chains with different summation orders
