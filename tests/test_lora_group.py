"""sloth.nn.lora_linear_group (projections sharing x, one GEMM for the LoRA A products) against one
sloth.lora_linear per projection and the plain-torch reference: outputs, dx, dA, dB, dbias."""

import pytest
import torch

import sloth
from sloth import reference
from sloth.nn.lora_group import lora_linear_group
from test_lora_linear import HAS_CUDA, TOL, make_weight, rel_err

cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def make_projs(kind, in_f, outs, ranks, dtype, device, bias=(True, False, True)):
    g = torch.Generator().manual_seed(3)
    projs = []
    for i, (out_f, r) in enumerate(zip(outs, ranks)):
        W, qs = make_weight(kind, out_f, in_f, dtype, device, seed=i)
        A = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype).to(device).requires_grad_()
        B = (torch.randn(out_f, r, generator=g) / r**0.5).to(dtype).to(device).requires_grad_()
        b = torch.randn(out_f, generator=g).to(dtype).to(device).requires_grad_() if bias[i % 3] else None
        projs.append(sloth.LoraProj(W, A, B, 0.5 + i, b, qs))
    return projs


def grads(ts):
    out = [t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("kind,dtype", [("nf4", torch.float32), ("dense", torch.float32), ("nf4", torch.bfloat16),
                                        ("bnb", torch.bfloat16), ("mxfp4", torch.float16)])
@pytest.mark.parametrize("M,lead", [(1, ()), (5, (2,)), (257, ())])
def test_group_matches_separate_and_reference(device, kind, dtype, M, lead):
    if dtype != torch.float32 and device == "cpu" and M == 257:
        pytest.skip("slow on the CPU")  # the same code path runs with M = 5
    in_f, outs, ranks = 256, (256, 64, 96), (16, 8, 16)  # q, k, v of a GQA attention (odd sizes, mixed ranks)
    projs = make_projs(kind, in_f, outs, ranks, dtype, device)
    params = [t for p in projs for t in (p.lora_A, p.lora_B, p.bias) if t is not None]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*lead, M, in_f, generator=g).to(dtype).to(device).requires_grad_()
    dys = [torch.randn(*lead, M, o, generator=g).to(dtype).to(device) for o in outs]

    ys = lora_linear_group(x, projs)
    torch.autograd.backward(ys, dys)
    got = [x.grad.clone()] + grads(params)
    x.grad = None
    sep = [sloth.lora_linear(x, p.weight, p.lora_A, p.lora_B, p.scaling, bias=p.bias, quant_state=p.quant_state)
           for p in projs]
    torch.autograd.backward(sep, dys)
    want = [x.grad.clone()] + grads(params)
    x.grad = None
    xr = x.detach().float().requires_grad_()
    pr = [t.detach().float().requires_grad_() for t in params]
    it = iter(pr)
    refs = [reference.lora_linear.lora_linear(xr, p.weight, next(it), next(it), p.scaling,
                                              bias=next(it) if p.bias is not None else None, quant_state=p.quant_state)
            for p in projs]
    torch.autograd.backward(refs, [d.float() for d in dys])
    ref = [xr.grad] + [t.grad for t in pr]

    tol = TOL[dtype]
    for y, s, r, o in zip(ys, sep, refs, outs):
        assert y.shape == (*lead, M, o) and y.dtype == dtype
        assert rel_err(y, r) <= tol and rel_err(y, s) <= tol
    for i, (a, b, r) in enumerate(zip(got, want, ref)):
        assert a.dtype == b.dtype
        assert rel_err(a, r) <= tol, f"grad {i}: {rel_err(a, r):.2e} against the reference"
        assert rel_err(a, b) <= tol, f"grad {i}: {rel_err(a, b):.2e} against separate lora_linear calls"


def test_group_falls_back_and_checks():
    projs = make_projs("nf4", 128, (64, 32), (8, 8), torch.float32, "cpu")
    x = torch.randn(3, 128)
    plain = sloth.LoraProj(projs[1].weight, None, None, 1.0, None, projs[1].quant_state)  # no LoRA: one by one
    ys = lora_linear_group(x, [projs[0], plain])
    assert torch.allclose(ys[1], sloth.lora_linear(x, plain.weight, None, None, quant_state=plain.quant_state))
    assert [y.shape for y in lora_linear_group(x[:0], projs)] == [(0, 64), (0, 32)]
    with pytest.raises(ValueError, match="last dimension"):
        lora_linear_group(torch.randn(3, 100), projs)
    other = make_projs("nf4", 64, (32,), (8,), torch.float32, "cpu")[0]
    with pytest.raises(ValueError, match="last dimension"):  # a projection of another input size
        lora_linear_group(x, [projs[0], other])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("grouped", [True, False])
def test_group_without_outputs_has_the_same_backward(device, grouped):
    """need_output=False (a recompute taking the outputs' values from elsewhere): zeros for the outputs, and
    exactly the gradients of the call that computes them (grouped, and one by one when grouping does not apply)."""
    projs = make_projs("nf4", 128, (64, 32, 32), (8, 8, 4), torch.float32, device)
    if not grouped:  # a projection without LoRA: lora_linear_group runs them one by one
        projs[1] = sloth.LoraProj(projs[1].weight, None, None, 1.0, None, projs[1].quant_state)
    params = [t for p in projs for t in (p.lora_A, p.lora_B, p.bias) if t is not None]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 128, generator=g).to(device).requires_grad_()
    dys = [torch.randn(7, o, generator=g).to(device) for o in (64, 32, 32)]
    results = []
    for need in (True, False):
        ys = lora_linear_group(x, projs, need_output=need)
        assert all(y.shape == (7, o) for y, o in zip(ys, (64, 32, 32)))
        assert need or all(not y.any() for y in ys)
        torch.autograd.backward(ys, dys)
        results.append([x.grad.clone()] + grads(params))
        x.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)
