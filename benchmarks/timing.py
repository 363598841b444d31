"""GPU timing helpers shared by the benchmarks: CUDA-event medians and a results table."""

from __future__ import annotations

import statistics

import torch

RESULTS: list[dict] = []  # rows printed at the end of a benchmark session


def cuda_median_ms(fn, *, iters: int = 50, warmup: int = 10, inner: int = 1) -> float:
    """Median over `iters` of the device time of `inner` back-to-back calls of fn, per call, in ms.

    With inner = 1 the time includes the host's launch latency (the GPU idles until the call's kernels
    arrive); for kernels of tens of microseconds pass inner >= 10 to measure the device's throughput.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_median_ms(fn, *, calls: int = 20, reps: int = 25) -> float:
    """Median ms per call of fn, captured ``calls`` times back to back in one CUDA graph (no launch gaps) and
    replayed ``reps`` times; three warm-up calls on a side stream first (lazy initializations stay out of the
    capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def peak_extra_gib(fn) -> float:
    """Peak memory fn allocates above what was allocated before it ran, in GiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def record(benchmark, group: str, name: str, ms: float, **extra) -> None:
    """Keep one result for the session table and in pytest-benchmark's extra_info."""
    row = {"group": group, "name": name, "ms": ms, **extra}
    RESULTS.append(row)
    if benchmark is not None:
        benchmark.extra_info.update(row)


def format_table() -> str:
    lines = []
    for r in RESULTS:
        extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("group", "name", "ms"))
        lines.append(f"{r['group']:28s} {r['name']:34s} {r['ms']:9.4f} ms  {extra}")
    return "\n".join(lines)
