"""Time SDPA's CUDA backends (flash, cuDNN, efficient) on a training-shaped causal GQA attention, forward and
forward + backward, and compare their outputs and gradients with the flash backend's.

python benchmarks/sdpa_backends.py [--batch 2 --seq 2048 --heads 32 --kv-heads 8 --head-dim 128]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps  # ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, H, Hk, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    # transformers' layout: [B, S, H, D] projections transposed to [B, H, S, D] views
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    flops_fwd = 4 * B * H * S * S * D / 2  # causal
    ref = None
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fwd():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            fwd().backward(do)
        try:
            o = fwd()
            fwd_bwd()
        except RuntimeError as e:
            print(f"{name}: unavailable ({str(e).splitlines()[0][:120]})")
            continue
        got = (o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float())
        if ref is None:
            ref = got
        err = [(x - y).abs().max().item() for x, y in zip(got, ref)]
        tf, tb = timed(fwd), timed(fwd_bwd)
        print(f"{name:9s} fwd {tf:.3f} ms ({flops_fwd / tf / 1e9:.0f} TFLOP/s)  fwd+bwd {tb:.3f} ms "
              f"({3.5 * flops_fwd / tb / 1e9:.0f} TFLOP/s)  max|diff| vs flash o/dq/dk/dv "
              + " ".join(f"{e:.2e}" for e in err))


if __name__ == "__main__":
    main()
