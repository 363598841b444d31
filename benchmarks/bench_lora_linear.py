"""QLoRA linear benchmarks (CUDA only), each next to the baseline a user would otherwise run, in one run.

(a) small M (generation): W [14336, 4096] NF4 (double-quantized absmax), M = 1 and 8: sloth's fused GEMV
    (with and without a r=16 LoRA term) vs bitsandbytes.matmul_4bit vs bf16 cuBLAS on the dense weight;
    median per call over CUDA-graph replays, and GB/s over the packed weight (+ absmax).
(b) large M (training): Llama-3.1-8B MLP (4096 -> 14336 -> 4096, gate / up / down), 4096 tokens, NF4 +
    LoRA r=32, forward + backward (dx, dA, dB): sloth.lora_mlp vs the same GEMMs in bf16 cuBLAS without
    LoRA (target ratio <= 1.15) vs PEFT + bitsandbytes (Linear4bit + LoRA).

    pytest benchmarks/bench_lora_linear.py --benchmark-only      # pytest-benchmark
    python benchmarks/bench_lora_linear.py                       # table
"""

from __future__ import annotations

import pytest
import torch

import sloth
from timing import cuda_median_ms, graph_median_ms

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

N, K = 14336, 4096
DT = torch.bfloat16


def time_eager(fn, reps=20) -> float:
    """Median ms per call with CUDA events (for work that cannot be graph-captured, e.g. autograd)."""
    return cuda_median_ms(fn, iters=reps, warmup=3)


# ---------------------------------------------------------------- (a) small M
def small_m_setup(M):
    torch.manual_seed(0)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(DT)
    packed, qs = sloth.nf4_quantize(W, 64, compress_statistics=True)
    x = torch.randn(M, K, device="cuda", dtype=DT)
    A = (torch.randn(16, K, device="cuda") / K**0.5).to(DT)
    B = (torch.randn(N, 16, device="cuda") / 4).to(DT)
    nbytes = packed.numel() + qs.absmax.numel() * qs.absmax.element_size()
    return W, packed, qs, x, A, B, nbytes


#: Weight copies the "cold" timing cycles through (8 x 29 MB packed, 8 x 117 MB dense: far above the 50-60 MB L2),
#: so that every call streams its weight from DRAM as a model's distinct layers do; the "hot" timing repeats one
#: weight, which the L2 then partly holds.
COPIES = 8


def small_m_fns(M):
    """(hot, cold, packed bytes): per implementation, a function doing one call on the weight (hot), and one doing
    COPIES calls, each on its own copy of the weight (cold)."""
    import bitsandbytes as bnb

    W, packed, qs, x, A, B, nbytes = small_m_setup(M)
    bqs = qs.to_bitsandbytes()
    Ws = [W] + [W.clone() for _ in range(COPIES - 1)]
    ps = [packed] + [packed.clone() for _ in range(COPIES - 1)]

    def impls(Ws, ps):
        return {
            "sloth gemv": lambda: [sloth.lora_linear(x, p, None, None, quant_state=qs) for p in ps],
            "sloth gemv + lora r16": lambda: [sloth.lora_linear(x, p, A, B, 0.5, quant_state=qs) for p in ps],
            "bnb matmul_4bit": lambda: [bnb.matmul_4bit(x, p.t(), quant_state=bqs) for p in ps],
            "bf16 cublas (dense W)": lambda: [torch.nn.functional.linear(x, w) for w in Ws],
        }

    return impls(Ws[:1], ps[:1]), impls(Ws, ps), nbytes


@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("impl", ["sloth gemv", "sloth gemv + lora r16", "bnb matmul_4bit", "bf16 cublas (dense W)"])
def test_small_m(benchmark, M, impl):
    hot, cold, nbytes = small_m_fns(M)
    fn = hot[impl]
    ms = graph_median_ms(fn)
    ms_cold = graph_median_ms(cold[impl], calls=5) / COPIES
    benchmark.extra_info.update(ms_graph_median=ms, gb_per_s=nbytes / ms / 1e6, ms_graph_median_cold=ms_cold,
                                gb_per_s_cold=nbytes / ms_cold / 1e6)
    benchmark(lambda: (fn(), torch.cuda.synchronize()))


# ---------------------------------------------------------------- (b) large M
H, I, T, R = 4096, 14336, 4096, 32


def mlp_weights():
    torch.manual_seed(0)
    dense = {n: (torch.randn(o, i, device="cuda") / i**0.5).to(DT) for n, o, i in
             (("gate", I, H), ("up", I, H), ("down", H, I))}
    return dense


def sloth_mlp_step(dense):
    from sloth.nn.lora_mlp import LoraProj

    projs = {}
    for n, W in dense.items():
        packed, qs = sloth.nf4_quantize(W)
        A = (torch.randn(R, W.shape[1], device="cuda") / W.shape[1] ** 0.5).to(DT).requires_grad_()
        B = (torch.randn(W.shape[0], R, device="cuda") * 0.01).to(DT).requires_grad_()
        projs[n] = LoraProj(packed, A, B, 2.0, None, qs)
    x = torch.randn(T, H, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(T, H, device="cuda", dtype=DT)

    def step():
        y = sloth.lora_mlp(x, projs["gate"], projs["up"], projs["down"], "swiglu")
        y.backward(dy)
    return step


def dense_mlp_step(dense):
    x = torch.randn(T, H, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(T, H, device="cuda", dtype=DT)
    F = torch.nn.functional

    def step():
        y = F.linear(F.silu(F.linear(x, dense["gate"])) * F.linear(x, dense["up"]), dense["down"])
        y.backward(dy)
    return step


def peft_bnb_mlp_step(dense):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, W in dense.items():
                lin = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=DT, quant_type="nf4",
                                        compress_statistics=True)
                lin.weight = bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=True)
                setattr(self, n, lin)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    m = MLP().cuda()
    m.is_loaded_in_4bit = True
    pm = get_peft_model(m, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["gate", "up", "down"]))
    for n, p in pm.named_parameters():  # LoRA weights in bf16 (module.to(dtype) would cast the packed bytes)
        if "lora_" in n:
            p.data = p.data.to(DT)
    x = torch.randn(T, H, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(T, H, device="cuda", dtype=DT)

    def step():
        pm(x).backward(dy)
    return step


LARGE = {"sloth lora_mlp (nf4 + lora r32)": sloth_mlp_step, "bf16 cublas, no lora": dense_mlp_step,
         "peft + bitsandbytes (nf4 + lora r32)": peft_bnb_mlp_step}


@pytest.mark.parametrize("impl", list(LARGE))
def test_large_m_mlp(benchmark, impl):
    step = LARGE[impl](mlp_weights())
    benchmark.extra_info["ms_median"] = time_eager(step)
    benchmark(lambda: (step(), torch.cuda.synchronize()))


def main():
    import argparse

    ap = argparse.ArgumentParser(description="sloth.lora_linear vs its baselines: (a) small M, (b) the large-M MLP")
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    part = ap.parse_args().part
    print(f"device: {torch.cuda.get_device_name()}")
    if part in ("a", "all"):
        small_m_table()
    if part in ("b", "all"):
        large_m_table()


def small_m_table():
    print(f"\n(a) small M, W [{N}, {K}] NF4 double-quant (median ms per call, CUDA graphs; hot: one weight,"
          f" cold: {COPIES} copies in turn, from DRAM)")
    print(f"{'impl':32s} {'M':>3s} {'hot ms':>9s} {'GB/s':>6s} {'cold ms':>9s} {'GB/s':>6s}")
    for M in (1, 8):
        hot, cold, nbytes = small_m_fns(M)
        for name in hot:
            ms = graph_median_ms(hot[name])
            ms_cold = graph_median_ms(cold[name], calls=5) / COPIES
            print(f"{name:32s} {M:3d} {ms:9.4f} {nbytes / ms / 1e6:6.0f} {ms_cold:9.4f} {nbytes / ms_cold / 1e6:6.0f}")


def large_m_table():
    print(f"\n(b) Llama-3.1-8B MLP {H}->{I}->{H}, {T} tokens, forward + backward (median ms)")
    dense = mlp_weights()
    res = {}
    for name, make in LARGE.items():
        try:
            res[name] = time_eager(make(dense))
        except Exception as e:  # noqa: BLE001  (a missing baseline must not hide the others)
            print(f"{name}: failed: {e}")
    base = res.get("bf16 cublas, no lora")
    for name, ms in res.items():
        ratio = f"{ms / base:6.2f}x" if base else ""
        print(f"{name:40s} {ms:9.3f} {ratio}")


if __name__ == "__main__":
    main()
