"""NF4 quantize / dequantize against sloth.reference and against bitsandbytes (bit-exact)."""


import pytest
import torch

import sloth
from sloth.reference import nf4 as ref

from conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes: not multiples of the blocksize, odd element counts (a padding nibble), a single element
SHAPES = [(1,), (7,), (64,), (3, 65), (129, 31), (256, 256), (1000, 77), (4096, 129)]


def bnb_or_skip():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_dequantize(packed, qs):
    """bitsandbytes' dequantization: its CUDA kernel on the GPU; on the CPU its reference (pure PyTorch)
    backend, because its CPU C kernel mis-indexes blocks when a row is shorter than the blocksize
    (bitsandbytes 0.50: (64, 64) at blocksize 128 dequantizes with twice the quantization error)."""
    F = bnb_or_skip()
    if packed.device.type == "cuda":
        return F.dequantize_4bit(packed, qs)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, _get_4bit_code("nf4", packed.device),
                                    qs.blocksize, qs.shape, qs.dtype)


def _assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():  # bitwise, so -0.0 vs 0.0 and NaN payloads count
        a, b = a.view(torch.int16 if a.element_size() == 2 else torch.int32), \
               b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    mism = (a != b).sum().item()
    assert mism == 0, f"{mism} of {a.numel()} elements differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 32, 256, 4096])
def test_quantize_matches_reference(device, dtype, shape, blocksize):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    packed, st = sloth.nf4_quantize(x, blocksize, compress_statistics=False)
    r = ref.nf4_quantize(x, blocksize, compress_statistics=False)
    assert packed.shape == ((x.numel() + 1) // 2, 1)
    _assert_bits_equal(packed, r["packed"])
    _assert_bits_equal(st.absmax, r["absmax"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_roundtrip_matches_reference(device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device)
    packed, st = sloth.nf4_quantize(x, 64, compress_statistics=True)
    r = ref.nf4_quantize(x, 64, compress_statistics=True)
    _assert_bits_equal(packed, r["packed"])
    _assert_bits_equal(st.absmax, r["absmax"])  # uint8 codes of the absmax
    _assert_bits_equal(st.state2.absmax, r["absmax2"])
    _assert_bits_equal(st.offset, r["offset"])
    for out_dtype in DTYPES:
        got = sloth.nf4_dequantize(
            packed, absmax=st.absmax, shape=shape, blocksize=64, dtype=out_dtype, code2=st.state2.code,
            absmax2=st.state2.absmax, offset=st.offset)
        want = ref.nf4_dequantize(r["packed"], r["absmax"], shape, 64, out_dtype, r["code2"], r["absmax2"],
                                  r["offset"])
        _assert_bits_equal(got, want)
    # quantization error is bounded: NF4 steps are at most 0.305 of absmax apart, so |x - x^| <= 0.16 absmax
    # (+ the 8-bit absmax error, < 1% of absmax)
    deq = sloth.nf4_dequantize(packed, st, dtype=torch.float32)
    blocks = x.float().reshape(-1)
    amax = torch.nn.functional.pad(blocks.abs(), (0, -blocks.numel() % 64)).view(-1, 64).amax(1)
    bound = 0.17 * amax.repeat_interleave(64)[: blocks.numel()]
    assert ((deq.reshape(-1) - blocks).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 512, 2048, 4096])
def test_dequantize_fp32_absmax_every_blocksize(device, blocksize):
    x = torch.randn(3, 4099, device=device)
    packed, st = sloth.nf4_quantize(x, blocksize, compress_statistics=False)
    for dt in DTYPES:
        got = sloth.nf4_dequantize(packed, st, dtype=dt)
        want = ref.nf4_dequantize(packed, st.absmax, x.shape, blocksize, dt)
        _assert_bits_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_unaligned_and_strided_inputs(device):
    # a packed view that starts at an odd byte exercises the element-wise path
    x = torch.randn(33, 64, device=device)
    packed, st = sloth.nf4_quantize(x, 64, compress_statistics=False)
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=device)
    buf[1:] = packed.view(-1)
    got = sloth.nf4_dequantize(buf[1:], st, dtype=torch.bfloat16)
    _assert_bits_equal(got, sloth.nf4_dequantize(packed, st, dtype=torch.bfloat16))
    # non-contiguous input to quantize
    xt = torch.randn(64, 40, device=device).t()
    p1, s1 = sloth.nf4_quantize(xt, 64, compress_statistics=False)
    p2, s2 = sloth.nf4_quantize(xt.contiguous(), 64, compress_statistics=False)
    _assert_bits_equal(p1, p2)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_blocks_and_empty(device):
    x = torch.zeros(2, 64, device=device)
    x[1, 3] = 2.5
    packed, st = sloth.nf4_quantize(x, 64, compress_statistics=False)
    out = sloth.nf4_dequantize(packed, st, dtype=torch.float32)
    assert torch.equal(out[0], torch.zeros(64, device=device))  # an all-zero block stays zero, not NaN
    assert out[1, 3].item() == 2.5
    e = torch.empty(0, 64, device=device)
    p, s = sloth.nf4_quantize(e, 64, compress_statistics=False)
    assert p.numel() == 0 and sloth.nf4_dequantize(p, s).shape == (0, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (333, 100), (1, 4097), (512, 1536)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_bitsandbytes_quant_state_dequantizes_bit_exact(device, dtype, shape, blocksize):
    """A bitsandbytes QuantState (double-quantized, as Transformers / PEFT make them) goes in as it is."""
    F = bnb_or_skip()
    x = torch.randn(shape, dtype=dtype, device=device)
    packed, qs = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    _assert_bits_equal(sloth.nf4_dequantize(packed, qs), bnb_dequantize(packed, qs))
    # the packed data and fp32 absmax sloth produces are bitsandbytes' own
    p2, st = sloth.nf4_quantize(x, blocksize, compress_statistics=True)
    _assert_bits_equal(p2, packed)
    _assert_bits_equal(st.offset, qs.offset)
    _assert_bits_equal(st.state2.code, qs.state2.code)
    _assert_bits_equal(st.state2.absmax, qs.state2.absmax)


@pytest.mark.parametrize("device", DEVICES)
def test_double_quant_codes_vs_bitsandbytes(device):
    """8-bit absmax codes: sloth picks the nearest code entry. bitsandbytes' CUDA kernel does too; its
    CPU library uses an approximate search that sometimes picks the neighbour. So: equal on CUDA, and on
    the CPU every difference is one step, and sloth's pick is never farther from the value than bnb's."""
    F = bnb_or_skip()
    x = torch.randn(4096, 333, device=device)
    _, qs = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, st = sloth.nf4_quantize(x, 64, compress_statistics=True)
    if device == "cuda":
        _assert_bits_equal(st.absmax, qs.absmax)
        return
    diff = st.absmax.int() - qs.absmax.int()
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01
    _, absmax = torch.ops.sloth.nf4_quantize(x, 64)
    code = qs.state2.code
    scaled = (absmax - qs.offset) * (1.0 / qs.state2.absmax.repeat_interleave(256)[: absmax.numel()])
    err_sloth = (code[st.absmax.long()] - scaled).abs()
    err_bnb = (code[qs.absmax.long()] - scaled).abs()
    assert (err_sloth <= err_bnb).all()


def test_dynamic_code_matches_bitsandbytes():
    F = bnb_or_skip()
    assert torch.equal(ref.dynamic_code(), F.create_dynamic_map(signed=True))


def test_nibble_order_pinned():
    """bitsandbytes puts element 2j in the HIGH nibble: pin it with a hand-built byte."""
    # codes 15 (1.0) for element 0 and 0 (-1.0) for element 1 -> byte 0xF0
    x = torch.tensor([1.0, -1.0])
    packed, st = sloth.nf4_quantize(x, 64, compress_statistics=False)
    assert packed.view(-1).tolist() == [0xF0]
    absmax = torch.tensor([2.0])
    out = sloth.nf4_dequantize(torch.tensor([[0x7F]], dtype=torch.uint8), absmax=absmax, shape=(2,),
                               dtype=torch.float32)
    assert out.tolist() == [0.0, 2.0]


def test_double_quant_formula_pinned():
    """absmax = code2[q] * absmax2[i // 256] + offset, then NF4[q] * absmax, in fp32."""
    code2 = torch.linspace(-1, 1, 256)
    q = torch.tensor([255, 0, 128] + [10] * 254 + [200], dtype=torch.uint8)  # 258 blocks -> 2 nested blocks
    absmax2 = torch.tensor([3.0, 0.5])
    offset = torch.tensor(0.25)
    n = 258 * 64
    packed = torch.full(((n + 1) // 2, 1), 0xFF, dtype=torch.uint8)  # every element NF4 code 15 = 1.0
    out = sloth.nf4_dequantize(packed, absmax=q, shape=(n,), blocksize=64, dtype=torch.float32, code2=code2,
                               absmax2=absmax2, offset=offset)
    expect = code2[q.long()] * absmax2[torch.arange(258) // 256] + offset
    assert torch.equal(out.view(258, 64)[:, 0], expect)
    assert torch.equal(out.view(258, 64)[:, 63], expect)


class TestErrors:
    def test_bad_dtype(self):
        with pytest.raises(TypeError, match="dtype"):
            sloth.nf4_quantize(torch.zeros(64, dtype=torch.int32))

    def test_bad_blocksize(self):
        with pytest.raises(ValueError, match="blocksize"):
            sloth.nf4_quantize(torch.zeros(64), blocksize=48)

    def test_wrong_shape(self):
        p, st = sloth.nf4_quantize(torch.zeros(64, 64), compress_statistics=False)
        with pytest.raises(ValueError, match="packed holds"):
            sloth.nf4_dequantize(p, absmax=st.absmax, shape=(64, 65))

    def test_wrong_blocksize_for_absmax(self):
        p, st = sloth.nf4_quantize(torch.zeros(64, 64), compress_statistics=False)
        with pytest.raises(ValueError, match="absmax has"):
            sloth.nf4_dequantize(p, absmax=st.absmax, shape=(64, 64), blocksize=128)

    def test_double_quant_needs_state(self):
        p, st = sloth.nf4_quantize(torch.zeros(64, 64))
        with pytest.raises(ValueError, match="double-quantized"):
            sloth.nf4_dequantize(p, absmax=st.absmax, shape=(64, 64))

    def test_bad_out_dtype(self):
        p, st = sloth.nf4_quantize(torch.zeros(64), compress_statistics=False)
        with pytest.raises(TypeError, match="output dtype"):
            sloth.nf4_dequantize(p, absmax=st.absmax, shape=(64,), dtype=torch.int8)

    def test_not_nf4(self):
        p, st = sloth.nf4_quantize(torch.zeros(64), compress_statistics=False)
        st.quant_type = "fp4"
        with pytest.raises(ValueError, match="nf4"):
            sloth.nf4_dequantize(p, st)

    def test_missing_state(self):
        with pytest.raises(ValueError, match="quant_state"):
            sloth.nf4_dequantize(torch.zeros(32, 1, dtype=torch.uint8))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    def test_device_mismatch(self):
        p, st = sloth.nf4_quantize(torch.zeros(64), compress_statistics=False)
        with pytest.raises(ValueError, match="device"):
            sloth.nf4_dequantize(p.cuda(), absmax=st.absmax, shape=(64,))


def test_to_bitsandbytes_state():
    bnb_or_skip()
    x = torch.randn(128, 64)
    packed, st = sloth.nf4_quantize(x)
    qs = st.to_bitsandbytes()
    assert torch.equal(bnb_dequantize(packed, qs), sloth.nf4_dequantize(packed, st))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_nan_out(device, dtype):
    """A block holding a NaN gets a NaN absmax and dequantizes to NaN (bitsandbytes' behaviour; it came back as
    numbers, -absmax); the other blocks are untouched. Double quantization: the absmax mean is NaN, so everything
    is, as with bitsandbytes."""
    x = torch.randn(4, 64, device=device).to(dtype)
    x[1, 7] = float("nan")
    packed, state = sloth.nf4_quantize(x, 64, compress_statistics=False)
    assert torch.isnan(state.absmax[1]) and torch.isfinite(state.absmax[[0, 2, 3]]).all()
    y = sloth.nf4_dequantize(packed, state)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    want = ref.nf4_dequantize(packed, state.absmax, x.shape, 64, dtype)
    assert torch.equal(y[[0, 2, 3]], want[[0, 2, 3]]) and torch.isnan(want[1]).all()
    packed, state = sloth.nf4_quantize(x, 64, compress_statistics=True)
    assert torch.isnan(sloth.nf4_dequantize(packed, state)).all()
    q, am = torch.ops.sloth.blockwise8_quantize(x.reshape(-1), ref.dynamic_code(device), 64)
    assert torch.isnan(am[1]) and torch.isfinite(am[[0, 2, 3]]).all()


def test_nan_matches_bitsandbytes():
    F = bnb_or_skip()
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    q, s = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    want = F.dequantize_4bit(q, s)
    packed, state = sloth.nf4_quantize(x, 64, compress_statistics=False)
    got = sloth.nf4_dequantize(packed, state)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_blocksizes_raise(device):
    """blocksize 0 divided by zero in C++ (SIGFPE); every op checks it now, called directly too."""
    x = torch.randn(4, 64, device=device)
    for bs in (0, -64, 48):
        with pytest.raises(RuntimeError, match="blocksize"):
            torch.ops.sloth.nf4_quantize(x, bs)
    packed, absmax = torch.ops.sloth.nf4_quantize(x, 64)
    with pytest.raises(RuntimeError, match="blocksize"):
        torch.ops.sloth.nf4_dequantize(packed, absmax, [4, 64], 0, torch.float32)
    with pytest.raises(RuntimeError, match="packed holds"):  # it segfaulted
        torch.ops.sloth.nf4_dequantize(packed, absmax, [4000, 64], 64, torch.float32)
    with pytest.raises(RuntimeError, match="blocksize"):
        torch.ops.sloth.blockwise8_quantize(x, ref.dynamic_code(device), 0)
    with pytest.raises(RuntimeError, match="256 entries"):  # it read past the short code
        torch.ops.sloth.blockwise8_quantize(x, ref.dynamic_code(device)[:16], 64)
