"""Linear cross-entropy, forward + backward: sloth (chunked, fused) vs plain PyTorch (fp32 logits + F.cross_entropy).

    pytest benchmarks/bench_cross_entropy.py          (pytest-benchmark; CUDA only)
    python benchmarks/bench_cross_entropy.py          (prints a table)
    python benchmarks/bench_cross_entropy.py --floor  (frozen W: sloth next to its two GEMMs alone)

Time: CUDA events, median of several iterations after warm-up. Memory: peak allocated during one step minus the
memory allocated before it (inputs alive), so it includes dh (N * H * 2 bytes) and dW when trainable.
TFLOP/s counts the GEMMs only: 2 x 2 N V H (frozen W: logits, dh) or 3 x 2 N V H (trainable: + dW).
Targets on H100 (frozen W, H=4096, V=128256, bf16): N=8192 <= 28 ms, <= +0.10 GiB; N=32768 <= 98 ms, <= +0.30 GiB.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from timing import cuda_median_ms

GIB = 1 << 30
#: (tokens N, vocab V, hidden H, trainable W)
CASES = [
    (8192, 128256, 4096, False),
    (32768, 128256, 4096, False),
    (8192, 128256, 4096, True),
    (8192, 262144, 4096, False),
]
IMPLS = ("sloth", "torch")


def make_inputs(n, v, h, trainable, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_()  # [tokens, hidden]
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_(trainable)  # [V, H]
    labels = torch.randint(0, v, (n,), device=device, generator=g)  # [tokens]
    labels[::10] = -100
    return hidden, weight, labels


def step_fn(impl, hidden, weight, labels, chunk_size=None):
    if impl == "sloth":
        import sloth

        def step():
            sloth.linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size).backward()
    else:
        def step():
            logits = (hidden @ weight.t()).float()  # [tokens, V] fp32, as Transformers' loss upcasts
            F.cross_entropy(logits, labels, ignore_index=-100).backward()
    return step


def clear_grads(*ts):
    for t in ts:
        t.grad = None


def measure(impl, n, v, h, trainable, iters=10, warmup=2, chunk_size=None):
    """(median ms, extra peak GiB, TFLOP/s) of one forward + backward step; None values on OOM."""
    hidden, weight, labels = make_inputs(n, v, h, trainable)
    step = step_fn(impl, hidden, weight, labels, chunk_size)
    try:
        for _ in range(warmup):
            clear_grads(hidden, weight)
            step()
        torch.cuda.synchronize()
        clear_grads(hidden, weight)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / GIB
        times = []
        for _ in range(iters):
            clear_grads(hidden, weight)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    except torch.OutOfMemoryError:
        clear_grads(hidden, weight)
        del hidden, weight, labels, step
        torch.cuda.empty_cache()
        return None, None, None
    ms = statistics.median(times)
    flops = (3 if trainable else 2) * 2 * n * v * h
    del hidden, weight, labels, step
    torch.cuda.empty_cache()
    return ms, extra, flops / (ms * 1e-3) / 1e12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,v,h,trainable", CASES)
def test_linear_cross_entropy(benchmark, impl, n, v, h, trainable):
    ms, extra, tflops = measure(impl, n, v, h, trainable)
    if ms is None:
        pytest.skip(f"{impl} ran out of memory at N={n}, V={v}")
    benchmark.extra_info.update(cuda_event_median_ms=ms, extra_peak_gib=extra, gemm_tflops=tflops)
    hidden, weight, labels = make_inputs(n, v, h, trainable)
    step = step_fn(impl, hidden, weight, labels)

    def run():
        clear_grads(hidden, weight)
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def main():
    print(f"{torch.cuda.get_device_name()}  bf16, forward + backward")
    print(f"{'N':>6} {'V':>7} {'H':>5} {'W':>9} {'impl':>6} {'ms':>9} {'extra GiB':>10} {'TFLOP/s':>8}")
    for n, v, h, trainable in CASES:
        for impl in IMPLS:
            ms, extra, tflops = measure(impl, n, v, h, trainable)
            w = "trainable" if trainable else "frozen"
            if ms is None:
                print(f"{n:>6} {v:>7} {h:>5} {w:>9} {impl:>6} {'OOM':>9}")
            else:
                print(f"{n:>6} {v:>7} {h:>5} {w:>9} {impl:>6} {ms:>9.2f} {extra:>10.3f} {tflops:>8.1f}")


def sweep():
    """Rows per chunk x vocabulary block of the online frozen-W path at N = 8192: the time / memory trade-off
    behind the defaults (1024 rows, 8192 columns). Memory above the inputs: dh (64 MiB) + rows x H fp32 + rows x
    block bf16. Each chunk's two GEMMs stream all of W (1.05 GB at V = 128256, H = 4096): 2 (N / rows) x 1.05 GB
    of traffic, overlapped with the math once rows >= ~512."""
    from sloth.nn import _online_head

    default = _online_head.VOCAB_BLOCK
    print(f"{'rows':>6} {'block':>6} {'ms':>9} {'extra GiB':>10} {'TFLOP/s':>8}")
    import sys

    grid = [(512, 16384), (768, 8192), (1024, 8192), (1024, 16384)] if "--short" in sys.argv else \
        [(r, b) for r in (512, 1024, 2048) for b in (2048, 4096, 8192)]
    for rows, block in grid:
        _online_head.VOCAB_BLOCK = block
        ms, extra, tflops = measure("sloth", 8192, 128256, 4096, False, chunk_size=rows)
        print(f"{rows:>6} {block:>6} {ms:>9.2f} {extra:>10.3f} {tflops:>8.1f}")
    _online_head.VOCAB_BLOCK = default


def gemm_floor(n, v, h, iters=5):
    """Median ms of the online path's two block GEMMs alone (the logits GEMM and the fp32-accumulating dh GEMM
    of every [1024, VOCAB_BLOCK] block, in the same order, without the softmax kernels): the time sloth's op
    cannot go below with cuBLAS. Run back to back, long enough (~0.1 s) for the GPU to reach its power-limited
    clock, as the op does."""
    from sloth.nn import _chunking, _online_head

    hidden, weight, _ = make_inputs(n, v, h, False)
    hidden = hidden.detach()
    rows, vb = _chunking.ONLINE_ROWS, _online_head.VOCAB_BLOCK
    buf = hidden.new_empty((rows * vb,))  # one [rows, vb] block of logits
    acc = hidden.new_empty((rows, h), dtype=torch.float32)  # [rows, hidden]

    def run():
        for s in range(0, n, rows):
            h_c = hidden[s:s + rows]
            for v0 in range(0, v, vb):
                w_b = weight[v0:v0 + vb]  # [vb, hidden]
                c, b = h_c.shape[0], w_b.shape[0]
                blk = _chunking.chunk_logits(h_c, w_b, None, buf[: c * b].view(c, b))
                _online_head._accumulate(acc[:c], blk, w_b, v0 == 0)

    return cuda_median_ms(run, iters=iters, warmup=1)


def floor():
    """sloth's frozen-W op next to its own GEMMs alone (gemm_floor), in one run."""
    print(f"{torch.cuda.get_device_name()}  bf16, frozen W, forward + backward")
    print(f"{'N':>6} {'V':>7} {'sloth ms':>9} {'GEMMs ms':>9} {'ratio':>6} {'GEMM TFLOP/s':>13}")
    for n, v, h, trainable in CASES:
        if trainable:
            continue
        ms = measure("sloth", n, v, h, False)[0]
        g = gemm_floor(n, v, h)
        print(f"{n:>6} {v:>7} {ms:>9.2f} {g:>9.2f} {ms / g:>6.3f} {2 * 2 * n * v * h / (g * 1e-3) / 1e12:>13.0f}")


if __name__ == "__main__":
    import sys

    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_entropy needs a CUDA GPU")
    sweep() if "--sweep" in sys.argv else floor() if "--floor" in sys.argv else main()
