"""MXFP4 quantize / dequantize against sloth.reference and Transformers' gpt-oss dequantization."""

import pytest
import torch

import sloth
from sloth.reference import mxfp4 as ref

from conftest import DEVICES
from test_nf4 import _assert_bits_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_mx(shape, device, top=256):
    """Random blocks, and scales over the whole E8M0 range including 0 (2^-127) and 255 (NaN)."""
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(0, top, shape, dtype=torch.uint8, device=device)
    return blocks, scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 7, 3), (4, 33, 90)])
def test_dequantize_matches_reference(device, dtype, shape):
    blocks, scales = random_mx(shape, device)
    _assert_bits_equal(sloth.mxfp4_dequantize(blocks, scales, dtype), ref.mxfp4_dequantize(blocks, scales, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 6, 3), (3, 64, 90)])  # [experts, rows, groups] as gpt-oss stores them
def test_dequantize_bit_exact_with_transformers(device, dtype, shape):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    # scales up to 254: 255 is the E8M0 NaN (sloth: NaN, OCP MX), which Transformers' ldexp reads as 2^128
    blocks, scales = random_mx(shape, device, top=255)
    scales[0, 0, 0] = 0  # 2^-127: subnormal in fp32, zero in fp16
    want = mx.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, G * 32, rows]: transposed
    got = sloth.mxfp4_dequantize(blocks, scales, dtype)  # [E, rows, G * 32]
    _assert_bits_equal(got.transpose(1, 2).contiguous(), want)


def test_nibble_order_and_scale_pinned():
    """Element 2j is the LOW nibble; value = E2M1[nibble] * 2^(scale - 127)."""
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x2F  # element 0: code 0xF = -6.0, element 1: code 0x2 = 1.0
    scales = torch.tensor([128], dtype=torch.uint8)  # 2^1
    out = sloth.mxfp4_dequantize(blocks, scales, torch.float32)
    assert out[:2].tolist() == [-12.0, 2.0] and out[2:].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32,), (3, 64), (5, 7, 96), (1, 2880)])
def test_quantize_matches_reference(device, dtype, shape):
    x = (torch.randn(shape, device=device) * torch.logspace(-3, 3, shape[-1], device=device)).to(dtype)
    blocks, scales = sloth.mxfp4_quantize(x)
    rb, rs = ref.mxfp4_quantize(x)
    _assert_bits_equal(scales, rs)
    _assert_bits_equal(blocks, rb)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_roundtrip_error_bound(device):
    """E2M1 with the OCP scale: |x| <= 6 * scale always holds (amax < 2^(e+1) = 8 * scale would saturate at
    most to 6 * scale), so the error is at most half a step (scale) for unsaturated elements, and
    saturated ones (|x| > 6 scale) lose at most 2 * scale."""
    x = torch.randn(64, 256, device=device)
    blocks, scales = sloth.mxfp4_quantize(x)
    y = sloth.mxfp4_dequantize(blocks, scales, torch.float32)
    scale = ref.e8m0_to_float(scales).repeat_interleave(32, dim=-1)
    assert ((y - x).abs() <= 2 * scale).all()
    assert ((y - x).abs() <= 0.5 * 2 * scale)[x.abs() <= 4 * scale].all()  # step is 2*scale above 4*scale


def test_e2m1_ties_to_even():
    # with scale 2^0 (block amax in [4, 8) -> exponent 2 - 2 = 0): ties 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
    vals = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] + [4.0] * 24)
    blocks, scales = sloth.mxfp4_quantize(vals)
    assert scales.item() == 127
    y = sloth.mxfp4_dequantize(blocks, scales, torch.float32)
    assert y[:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


class TestErrors:
    def test_last_dim_not_multiple_of_32(self):
        with pytest.raises(ValueError, match="multiple of 32"):
            sloth.mxfp4_quantize(torch.zeros(4, 33))

    def test_bad_blocks_shape(self):
        with pytest.raises(ValueError, match=r"\[..., G, 16\]"):
            sloth.mxfp4_dequantize(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))

    def test_bad_blocks_dtype(self):
        with pytest.raises(TypeError, match="uint8"):
            sloth.mxfp4_dequantize(torch.zeros(4, 16), torch.zeros(4, dtype=torch.uint8))

    def test_int_input(self):
        with pytest.raises(TypeError, match="dtype"):
            sloth.mxfp4_quantize(torch.zeros(32, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_nan_out(device, dtype):
    """A block holding a NaN gets the E8M0 NaN scale 255 and dequantizes to NaN (the whole block); inf keeps the
    largest finite scale; other blocks are untouched."""
    x = torch.randn(3, 96, device=device).to(dtype)
    x[0, 5] = float("nan")
    x[2, 70] = float("inf")
    blocks, scales = sloth.mxfp4_quantize(x)
    assert scales[0, 0].item() == 255 and scales[2, 2].item() == 254
    rb, rs = ref.mxfp4_quantize(x)
    _assert_bits_equal(scales, rs)
    y = sloth.mxfp4_dequantize(blocks, scales, dtype)
    assert torch.isnan(y[0, :32]).all() and not torch.isnan(y[0, 32:]).any() and not torch.isnan(y[1]).any()
    assert torch.equal(y[1], sloth.mxfp4_dequantize(*sloth.mxfp4_quantize(x[1:2]), dtype)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_misaligned(device):
    """K = 0 gives empty outputs (it divided by zero: SIGFPE); K = 48 or a 0-d input is an error."""
    blocks, scales = sloth.mxfp4_quantize(torch.randn(4, 0, device=device))
    assert blocks.shape == (4, 0, 16) and scales.shape == (4, 0)
    assert sloth.mxfp4_dequantize(blocks, scales, torch.float32).shape == (4, 0)
    blocks, scales = torch.ops.sloth.mxfp4_quantize(torch.randn(0, 64, device=device))
    assert blocks.shape == (0, 2, 16)
    for bad in (torch.randn(4, 48, device=device), torch.tensor(1.0, device=device)):
        with pytest.raises(RuntimeError, match="multiple of 32"):
            torch.ops.sloth.mxfp4_quantize(bad)
