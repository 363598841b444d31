"""MoE experts layer: sloth's experts implementation against torch._grouped_mm as Transformers 5 calls it
(``experts_implementation="grouped_mm"``, on the bf16 stack, dequantized first where the experts are 4-bit),
forward + backward, in one run, with the dense bf16 GEMM rate and the copy bandwidth measured alongside.

    python benchmarks/bench_moe.py [--quick]        (or: pytest benchmarks/bench_moe.py)

Cases (issue 27): Qwen3-30B-A3B layer (hidden 2048, 768 per expert, 128 experts, top-8, 8192 tokens) with
trainable bf16 experts, and with frozen NF4 experts + LoRA r 16; gpt-oss-20b layer (hidden 2880, 32 experts,
top-4) and gpt-oss-120b (128 experts) with frozen MXFP4 experts + LoRA; decode (1-16 tokens, gpt-oss-20b MXFP4).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from timing import cuda_median_ms, graph_median_ms  # noqa: E402


def _experts_module(family, E, H, I, k):
    import transformers

    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
        m = Qwen3MoeExperts(cfg)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        cfg = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        m = GptOssExperts(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.cuda().to(torch.bfloat16), cfg


def _routing(T, E, k, g):
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def _step(module, impl, x, ids, w, backward=True):
    module.config._experts_implementation = impl
    out = module(x, ids, w)
    if backward:
        out.backward(torch.ones_like(out))
    return out


def _peak_extra(fn):
    """Peak memory above what is allocated before the call (bytes)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_rates():
    """(dense bf16 GEMM TFLOP/s, copy GB/s) on this GPU."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: a @ b, iters=10, warmup=3)
    big = torch.empty(2 * 1024**3 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    ms_c = cuda_median_ms(lambda: dst.copy_(big), iters=10, warmup=3)
    return 2 * 8192**3 / ms / 1e9, 2 * big.numel() * 2 / ms_c / 1e6


def run_case(name, family, E, H, I, k, T, mode, rows, iters=10):
    """mode: 'train_bf16' (trainable bf16 experts) | 'nf4_lora' | 'mxfp4_lora' | 'decode'."""
    from sloth.integrations import moe as integ

    integ.register()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids, w = _routing(T, E, k, g)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    backward = mode != "decode"
    x.requires_grad_(backward)
    flops = 2 * T * k * (H * 2 * I + I * H) * (3 if mode == "train_bf16" else (2 if backward else 1))
    bf16_stack = E * 3 * H * I * 2

    # baseline: Transformers' grouped_mm on the bf16 stack (trainable, or frozen with the stack dequantized)
    base, _ = _experts_module(family, E, H, I, k)
    for p in base.parameters():
        p.requires_grad_(mode == "train_bf16")
    fn_base = lambda: _step(base, "grouped_mm", x, ids, w, backward)  # noqa: E731
    ms_base = _time(fn_base, iters, graph=not backward)
    mem_base = _peak_extra(fn_base)
    res = {"case": name, "grouped_mm ms": ms_base, "grouped_mm TF/s": flops / ms_base / 1e9,
           "grouped_mm extra GB": mem_base / 1e9}

    mod, _ = _experts_module(family, E, H, I, k)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(base.named_parameters(), mod.named_parameters()):
            p2.copy_(p1)
    weight_bytes = bf16_stack
    if mode == "train_bf16":
        pass
    else:
        fmt = "nf4" if mode == "nf4_lora" else "mxfp4"
        integ.quantize_experts_(mod, fmt)
        weight_bytes = sum(b.numel() * b.element_size() for n, b in mod.named_buffers() if n.startswith("sloth_"))
        if backward:
            integ.add_lora_(mod, r=16, lora_alpha=16, dtype=torch.bfloat16)
        for n, p in mod.named_parameters():  # frozen experts (and biases); LoRA trains
            p.requires_grad_("sloth_lora" in n)
        # Unsloth's route for 4-bit experts: dequantize the whole stack, then grouped_mm (again in the backward)
        spec = integ.experts_spec(mod)

        def dequant_then_grouped_mm():
            with torch.no_grad():
                gu = spec.gate_up.dequantize(torch.bfloat16) if fmt == "nf4" else _dequant_fast(spec.gate_up)
                dn = spec.down.dequantize(torch.bfloat16) if fmt == "nf4" else _dequant_fast(spec.down)
            base.gate_up_proj.data = gu if family == "qwen3_moe" else gu.transpose(1, 2)
            base.down_proj.data = dn if family == "qwen3_moe" else dn.transpose(1, 2)
            return _step(base, "grouped_mm", x, ids, w, backward)

        if fmt == "mxfp4":
            ms_dq = cuda_median_ms(dequant_then_grouped_mm, iters=max(3, iters // 2), warmup=1)
            res["dequant+grouped_mm ms"] = ms_dq
    fn = lambda: _step(mod, "sloth", x, ids, w, backward)  # noqa: E731
    ms = _time(fn, iters, graph=not backward)
    mem = _peak_extra(fn)
    res.update({"sloth ms": ms, "sloth TF/s": flops / ms / 1e9, "sloth extra GB": mem / 1e9,
                "speedup": ms_base / ms, "weight GB read/pass": weight_bytes / 1e9,
                "bf16 stack GB": bf16_stack / 1e9})
    # accuracy against the grouped_mm output (same bf16 inputs; 4-bit cases compare to the dequantized stack)
    if mode in ("train_bf16", "decode"):
        with torch.no_grad():
            if mode == "decode":
                spec = integ.experts_spec(mod)
                base.gate_up_proj.data = _dequant_fast(spec.gate_up).transpose(1, 2)
                base.down_proj.data = _dequant_fast(spec.down).transpose(1, 2)
            o1 = _step(mod, "sloth", x.detach(), ids, w, False).float()
            o0 = _step(base, "grouped_mm", x.detach(), ids, w, False).float()
            res["max rel diff"] = ((o1 - o0).abs().max() / o0.abs().max()).item()
    rows.append(res)
    del base, mod
    torch.cuda.empty_cache()
    return res


def _time(fn, iters, graph):
    """Median ms per call: CUDA-event timing, or for decode (host-bound otherwise) the replay of a CUDA graph."""
    if graph:
        try:
            with torch.no_grad():
                return graph_median_ms(fn, calls=10, reps=10)
        except RuntimeError as e:  # not capturable: event timing (includes host launch latency)
            print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:80]})")
    return cuda_median_ms(fn, iters=iters, warmup=2)


def kernel_breakdown(T=8192, E=128, H=2048, I=768, k=8):
    """TFLOP/s of one grouped GEMM (the gate_up projection of the Qwen3-30B-A3B layer: [R, H] x [E, 2I, H]^T,
    and its transposed dX form) per weight format, next to torch._grouped_mm on the bf16 stack."""
    from sloth.ops.moe import MoEWeight, moe_grouped_gemm, moe_permute

    g = torch.Generator(device="cuda").manual_seed(0)
    ids, _ = _routing(T, E, k, g)
    ss, sp, off = moe_permute(ids, E)
    tok = torch.div(ss, k, rounding_mode="floor")
    R = T * k
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    xs = x[tok]
    dy = torch.randn(R, 2 * I, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    flops = 2 * R * 2 * I * H
    out = {}
    ms = cuda_median_ms(lambda: torch._grouped_mm(xs, w.transpose(1, 2), offs=off[1:]), iters=10, warmup=2)
    out["torch._grouped_mm fwd"] = flops / ms / 1e9
    ms = cuda_median_ms(lambda: torch._grouped_mm(dy, w, offs=off[1:]), iters=10, warmup=2)
    out["torch._grouped_mm dX"] = flops / ms / 1e9
    lt = torch.randn(R, 16, device="cuda", dtype=torch.bfloat16, generator=g)
    lB = torch.randn(E, 2 * I, 16, device="cuda", dtype=torch.bfloat16, generator=g)
    for fmt, mw in (("bf16", MoEWeight.dense(w)), ("nf4", MoEWeight.quantize_nf4(w)), ("mxfp4", MoEWeight.quantize_mxfp4(w))):
        ms = cuda_median_ms(lambda: moe_grouped_gemm(x, off, mw, rows=tok), iters=10, warmup=2)
        out[f"sloth {fmt} fwd (gather)"] = flops / ms / 1e9
        ms = cuda_median_ms(lambda: moe_grouped_gemm(x, off, mw, rows=tok, glu=1, return_pre=True), iters=10, warmup=2)
        out[f"sloth {fmt} fwd + SwiGLU + pre"] = flops / ms / 1e9
        ms = cuda_median_ms(lambda: moe_grouped_gemm(x, off, mw, rows=tok, lora_t=lt, lora_B=lB), iters=10, warmup=2)
        out[f"sloth {fmt} fwd + LoRA r16"] = flops / ms / 1e9
        ms = cuda_median_ms(lambda: moe_grouped_gemm(dy, off, mw, trans=True), iters=10, warmup=2)
        out[f"sloth {fmt} dX (transposed)"] = flops / ms / 1e9
    return out


def _dequant_fast(mw):
    from sloth.ops import mxfp4_dequantize

    return mxfp4_dequantize(mw.data, mw.scale, torch.bfloat16)


def main(quick=False):
    torch.backends.cuda.matmul.allow_tf32 = True
    tflops, gbs = measure_rates()
    print(f"{torch.cuda.get_device_name()}: dense bf16 GEMM {tflops:.0f} TFLOP/s, copy {gbs:.0f} GB/s")
    for name, tf in kernel_breakdown().items():
        print(f"  grouped GEMM, Qwen3-30B-A3B gate_up shape: {name}: {tf:.0f} TFLOP/s", flush=True)
    rows = []
    it = 5 if quick else 10
    cases = [
        ("qwen3-30b-a3b bf16 train 8192", "qwen3_moe", 128, 2048, 768, 8, 8192, "train_bf16"),
        ("qwen3-30b-a3b nf4+lora 8192", "qwen3_moe", 128, 2048, 768, 8, 8192, "nf4_lora"),
        ("gpt-oss-20b mxfp4+lora 8192", "gpt_oss", 32, 2880, 2880, 4, 8192, "mxfp4_lora"),
        ("gpt-oss-20b decode 1", "gpt_oss", 32, 2880, 2880, 4, 1, "decode"),
        ("gpt-oss-20b decode 4", "gpt_oss", 32, 2880, 2880, 4, 4, "decode"),
        ("gpt-oss-20b decode 16", "gpt_oss", 32, 2880, 2880, 4, 16, "decode"),
    ]
    if not quick:
        cases.append(("gpt-oss-120b mxfp4+lora 8192", "gpt_oss", 128, 2880, 2880, 4, 8192, "mxfp4_lora"))
    for c in cases:
        try:
            r = run_case(*c, rows=rows, iters=it if "decode" not in c[0] else 50)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        except Exception as e:  # report and go on: one failing case must not hide the others
            print(f"{c[0]}: FAILED {type(e).__name__}: {e}", flush=True)
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_moe():
    main(quick=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
