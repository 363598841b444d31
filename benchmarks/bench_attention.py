"""Attention forward + backward (CUDA): sloth.attention (sinks, window, packed documents) next to what users
have, in one run: SDPA (cuDNN / flash; cannot express sinks, so timed without them) and compiled flex_attention
with the sink folded into the log-sum-exp afterwards (out * sigmoid(lse - sink), Unsloth's route). Cases of
issue 32: gpt-oss (64 q / 8 kv heads, dim 64) causal + sinks at 4096 and 16384 tokens, window 128 + sinks at
16384, Llama (32 q / 8 kv heads, dim 128) causal 2 x 2048 without sinks, and 8 packed documents in 16384 tokens
(next to the dense batch [8, 2048] of the same work). TFLOP/s count the visible (query, key) pairs only:
forward 4 * pairs * D * q_heads, backward 2.5 times that; the dense bf16 GEMM rate of the same run is printed.

    python benchmarks/bench_attention.py [--impls sloth,sdpa,flex] [--cases gptoss4k,...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from timing import RESULTS, cuda_median_ms

DT = torch.bfloat16
# name: (batch, seq, q_heads, kv_heads, D, window, sinks, docs)
CASES = {
    "gptoss4k": (1, 4096, 64, 8, 64, None, True, 1),
    "gptoss16k": (1, 16384, 64, 8, 64, None, True, 1),
    "gptoss16k_w128": (1, 16384, 64, 8, 64, 128, True, 1),
    "llama2x2k": (2, 2048, 32, 8, 128, None, False, 1),
    "varlen8x2k": (1, 16384, 64, 8, 64, None, True, 8),
    "dense8x2k": (8, 2048, 64, 8, 64, None, True, 1),
}


def pairs(seq, window, docs):
    L = seq // docs
    per = sum(min(i + 1, window or L) for i in range(L))
    return per * docs


def gemm_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms = cuda_median_ms(lambda: a @ a, iters=20)
    return 2 * 8192**3 / ms / 1e9


def make(case):
    B, S, Hq, Hkv, D, window, sinks, docs = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=DT, generator=g).requires_grad_()
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=DT, generator=g).requires_grad_()
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=DT, generator=g).requires_grad_()
    s = (torch.randn(Hq, device="cuda", generator=g)).requires_grad_() if sinks else None
    return q, k, v, s


def run_sloth(case):
    import sloth

    B, S, Hq, Hkv, D, window, sinks, docs = CASES[case]
    q, k, v, s = make(case)
    kw = dict(window=window, sinks=s)
    if docs > 1:
        cu = torch.arange(0, S + 1, S // docs, device="cuda", dtype=torch.int32)
        q, k, v = (t.detach()[0].requires_grad_() for t in (q, k, v))
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S // docs, max_seqlen_k=S // docs)
    dout = torch.randn_like(q)

    def fwd():
        return sloth.attention(q, k, v, **kw)

    def step():
        fwd().backward(dout)

    return fwd, step


def run_sdpa(case):
    B, S, Hq, Hkv, D, window, sinks, docs = CASES[case]
    if window or docs > 1:
        return None
    q, k, v, _ = make(case)
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # [B, H, S, D]
    dout = torch.randn_like(qt)

    def fwd():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    def step():
        fwd().backward(dout)

    return fwd, step


_flex = None


def run_flex(case):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    B, S, Hq, Hkv, D, window, sinks, docs = CASES[case]
    q, k, v, s = make(case)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    L = S // docs

    def mask_mod(b, h, i, j):
        keep = (j <= i) & ((i // L) == (j // L))
        if window:
            keep = keep & (j > i - window)
        return keep

    bm = create_block_mask(mask_mod, None, None, S, S, device="cuda")
    dout = torch.randn_like(qt)

    def fwd():
        out, lse = _flex(qt, kt, vt, block_mask=bm, enable_gqa=True, return_lse=True)
        if s is None:
            return out
        # the sink folded in afterwards: softmax over (scores, sink) = softmax(scores) * sigmoid(lse - sink)
        return out * torch.sigmoid(lse - s[None, :, None]).unsqueeze(-1).to(out.dtype)

    def step():
        fwd().backward(dout)

    return fwd, step


IMPLS = {"sloth": run_sloth, "sdpa": run_sdpa, "flex": run_flex}


def bench(cases, impls):
    peak = gemm_tflops()
    print(f"{torch.cuda.get_device_name()}: dense bf16 GEMM 8192^3 {peak:.0f} TFLOP/s")
    print(f"{'case':<16}{'impl':<8}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}{'% GEMM':>8}")
    for case in cases:
        B, S, Hq, Hkv, D, window, sinks, docs = CASES[case]
        flops_f = 4 * B * pairs(S, window, docs) * D * Hq
        for impl in impls:
            try:
                r = IMPLS[impl](case)
                if r is None:
                    continue
                fwd, step = r
                with torch.no_grad():
                    tf = cuda_median_ms(fwd, iters=20, warmup=3)
                tfb = cuda_median_ms(step, iters=20, warmup=3)
            except Exception as e:  # noqa: BLE001  (a failing side is reported, the others still run)
                print(f"{case:<16}{impl:<8} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            tff, tffb = flops_f / tf / 1e9, 3.5 * flops_f / tfb / 1e9
            RESULTS.append(dict(group=f"attention {case}", name=impl, ms=tfb, fwd_ms=tf, tflops=tffb))
            print(f"{case:<16}{impl:<8}{tf:9.3f}{tff:10.0f}{tfb:9.3f}{tffb:10.0f}{100 * tffb / peak:8.0f}",
                  flush=True)
            torch.cuda.empty_cache()


def test_attention_benchmark():
    bench(list(CASES), ["sloth", "sdpa"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="sloth,sdpa,flex")
    p.add_argument("--cases", default=",".join(CASES))
    a = p.parse_args()
    bench(a.cases.split(","), a.impls.split(","))


if __name__ == "__main__":
    main()
