"""NF4 and MXFP4 dequantization bandwidth, sloth next to bitsandbytes / Transformers / a plain copy.

Effective bandwidth = (bytes read + bytes written) / time. Physical limit: the device-to-device copy
measured in the same run (bytes read + written), about 3.0 TB/s on an H100 SXM.
Run: python -m pytest benchmarks/bench_quant.py   (or python benchmarks/bench_quant.py)
"""

import pytest
import torch

import sloth
from timing import cuda_median_ms as _cuda_median_ms
from timing import format_table, record


def cuda_median_ms(fn, **kw):
    """Device time per call of back-to-back calls (these kernels take tens of microseconds: a lone call would
    also time the host's launch latency)."""
    return _cuda_median_ms(fn, inner=20, **kw)

NF4_SHAPE = (14336, 4096)                 # Llama-3.1-8B MLP weight
MX_BLOCKS = (32, 5760, 90, 16)           # gpt-oss-20b gate_up_proj_blocks [experts, rows, groups, 16]


def _tbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e12


@pytest.fixture(scope="module")
def nf4_weight():
    w = torch.randn(NF4_SHAPE, dtype=torch.bfloat16, device="cuda") * 0.02
    packed, state = sloth.nf4_quantize(w, 64, compress_statistics=True)
    return w, packed, state


def test_copy_bandwidth(benchmark):
    """The ceiling: a bf16 device-to-device copy of the dequantized size."""
    src = torch.randn(NF4_SHAPE, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * 2
    record(benchmark, "nf4 dequant [14336,4096] bf16", "bf16 copy (ceiling)", ms, TBps=_tbps(nbytes, ms))
    benchmark.pedantic(lambda: dst.copy_(src), rounds=5, iterations=10)


def test_write_bandwidth(benchmark):
    """The write-only ceiling: dequantization is 80% writes, so a fill of the output size bounds it too."""
    dst = torch.empty(NF4_SHAPE, dtype=torch.bfloat16, device="cuda")
    ms = cuda_median_ms(lambda: dst.fill_(1.0))
    record(benchmark, "nf4 dequant [14336,4096] bf16", "bf16 fill (write ceiling)", ms,
           TBps=_tbps(dst.numel() * 2, ms))
    benchmark.pedantic(lambda: dst.fill_(1.0), rounds=5, iterations=10)


def test_nf4_dequant_sloth(benchmark, nf4_weight):
    w, packed, state = nf4_weight
    out_bytes = w.numel() * 2 + packed.numel() + state.absmax.numel()
    ms = cuda_median_ms(lambda: sloth.nf4_dequantize(packed, state))
    raw = cuda_median_ms(lambda: torch.ops.sloth.nf4_dequantize(
        packed, state.absmax, list(NF4_SHAPE), 64, torch.bfloat16, state.state2.code, state.state2.absmax,
        state.offset, 256))
    record(benchmark, "nf4 dequant [14336,4096] bf16", "sloth", ms, TBps=_tbps(out_bytes, ms),
           raw_op_ms=raw, raw_TBps=_tbps(out_bytes, raw))
    benchmark.pedantic(lambda: sloth.nf4_dequantize(packed, state), rounds=5, iterations=10)


def test_nf4_dequant_bitsandbytes(benchmark, nf4_weight):
    F = pytest.importorskip("bitsandbytes.functional")
    w, packed, state = nf4_weight
    qs = state.to_bitsandbytes()
    assert torch.equal(F.dequantize_4bit(packed, qs), sloth.nf4_dequantize(packed, state))
    out_bytes = w.numel() * 2 + packed.numel() + state.absmax.numel()
    ms = cuda_median_ms(lambda: F.dequantize_4bit(packed, qs))
    record(benchmark, "nf4 dequant [14336,4096] bf16", "bitsandbytes", ms, TBps=_tbps(out_bytes, ms))
    benchmark.pedantic(lambda: F.dequantize_4bit(packed, qs), rounds=5, iterations=10)


def test_nf4_quantize(benchmark, nf4_weight):
    F = pytest.importorskip("bitsandbytes.functional")
    w, _, _ = nf4_weight
    ms = cuda_median_ms(lambda: sloth.nf4_quantize(w, 64, True), iters=20)
    ms_b = cuda_median_ms(lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                          iters=20)
    record(benchmark, "nf4 quantize [14336,4096] bf16", "sloth", ms, bnb_ms=ms_b, speedup=ms_b / ms)
    benchmark.pedantic(lambda: sloth.nf4_quantize(w, 64, True), rounds=3, iterations=3)


@pytest.fixture(scope="module")
def mx_weight():
    blocks = torch.randint(0, 256, MX_BLOCKS, dtype=torch.uint8, device="cuda")
    scales = torch.randint(118, 130, MX_BLOCKS[:-1], dtype=torch.uint8, device="cuda")
    return blocks, scales


def test_mxfp4_dequant_sloth(benchmark, mx_weight):
    blocks, scales = mx_weight
    nbytes = blocks.numel() + scales.numel() + blocks.numel() * 2 * 2
    ms = cuda_median_ms(lambda: sloth.mxfp4_dequantize(blocks, scales, torch.bfloat16), iters=20)
    copy_src = torch.empty(blocks.numel() * 2, dtype=torch.bfloat16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    ms_copy = cuda_median_ms(lambda: copy_dst.copy_(copy_src), iters=20)
    record(benchmark, "mxfp4 dequant gpt-oss-20b gate_up", "sloth", ms, TBps=_tbps(nbytes, ms),
           copy_TBps=_tbps(4 * copy_src.numel(), ms_copy))
    benchmark.pedantic(lambda: sloth.mxfp4_dequantize(blocks, scales, torch.bfloat16), rounds=3, iterations=3)


def test_mxfp4_dequant_transformers(benchmark, mx_weight):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = mx_weight
    nbytes = blocks.numel() + scales.numel() + blocks.numel() * 2 * 2
    want = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(want, sloth.mxfp4_dequantize(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous())
    del want
    ms = cuda_median_ms(lambda: mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16), iters=5,
                        warmup=2)
    record(benchmark, "mxfp4 dequant gpt-oss-20b gate_up", "transformers (transposed)", ms, TBps=_tbps(nbytes, ms))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "--benchmark-disable"]) or print(format_table()))
