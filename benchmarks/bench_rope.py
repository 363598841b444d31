"""RoPE of q and k (CUDA only): sloth's rope_ in place (the vectorized kernel; and the one-thread-per-pair kernel
that layouts without 16-byte alignment get, on a view shifted by one element), sloth's rope into new tensors (the
form torch.compile and the backward use) vs Transformers' apply_rotary_pos_emb (rotate_half, out of place) on the
layout a patched Llama-3.1-8B layer hands it: q [4096, 32, 128] and k [4096, 8, 128] bf16 views of one fused
projection output (token stride 6144). Bytes: q and k read and written once; the copy ceiling is ~4.5 TB/s on an
H200.

    python benchmarks/bench_rope.py
"""

from __future__ import annotations

import subprocess
import sys

import torch

from timing import graph_median_ms

T, H, KV, D = 4096, 32, 8, 128


def inputs(misaligned=False):
    buf = torch.randn(T * (H + 2 * KV) * D + 1, device="cuda", dtype=torch.bfloat16)
    qkv = buf[int(misaligned):].view(T, (H + 2 * KV) * D)  # [tokens, (H + 2 KV) D]
    heads = qkv.view(T, H + 2 * KV, D)
    q, k = heads[:, :H], heads[:, H:H + KV]  # strides (6144, 128, 1)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    emb = torch.cat([torch.arange(T, device="cuda").float()[:, None] * inv] * 2, -1)  # [tokens, D]
    return q, k, emb.cos().contiguous(), emb.sin().contiguous()


def measure(impl: str) -> float:
    import sloth  # noqa: F401  (registers torch.ops.sloth)

    q, k, cos, sin = inputs(misaligned=impl == "sloth_scalar")
    if impl in ("sloth", "sloth_scalar"):
        def fn():
            torch.ops.sloth.rope_(q, k, cos, sin, False)
    elif impl == "sloth_out":
        def fn():
            torch.ops.sloth.rope(q, k, cos, sin, False)
    else:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        qh, kh = q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, heads, tokens, D], as Llama calls it
        c, s = cos.bfloat16()[None], sin.bfloat16()[None]

        def fn():
            apply_rotary_pos_emb(qh, kh, c, s)
    return graph_median_ms(fn) * 1e3  # us per call


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(f"{measure(sys.argv[2]):.2f}")
        return
    nbytes = 2 * T * (H + KV) * D * 2  # read + write of q and k, bf16
    print(f"{torch.cuda.get_device_name()}  q [{T}, {H}, {D}] + k [{T}, {KV}, {D}] bf16, projection-view layout")
    rows = [("transformers apply_rotary_pos_emb", "hf"), ("sloth rope_ (unaligned: scalar kernel)", "sloth_scalar"),
            ("sloth rope_ (in place)", "sloth"), ("sloth rope (into new tensors)", "sloth_out")]
    for name, impl in rows:  # each in a fresh process (its own allocator and caches)
        out = subprocess.run([sys.executable, __file__, "--one", impl], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:36s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            continue
        us = float(out.stdout.strip().splitlines()[-1])
        print(f"{name:36s} {us:9.1f} us {nbytes / us / 1e6:8.2f} TB/s")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope needs a CUDA GPU")
    main()
