"""The op library itself: schemas, fake kernels (torch.compile), opcheck, `sloth info`, hipify sync."""

import pathlib
import subprocess
import sys

import pytest
import torch

import sloth
from sloth.reference.nf4 import dynamic_code

from conftest import DEVICES

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sample_calls(device):
    """(op, args) pairs covering every sloth op."""
    x = torch.randn(5, 70, device=device, dtype=torch.bfloat16)
    packed, absmax = torch.ops.sloth.nf4_quantize(x, 64)
    q, absmax2 = torch.ops.sloth.blockwise8_quantize(absmax, dynamic_code(device), 256)
    offset = torch.tensor(0.1, device=device)
    xm = torch.randn(3, 64, device=device)
    blocks, scales = torch.ops.sloth.mxfp4_quantize(xm)
    return [
        (torch.ops.sloth.nf4_quantize.default, (x, 64)),
        (torch.ops.sloth.nf4_dequantize.default, (packed, absmax, [5, 70], 64, torch.float16)),
        (torch.ops.sloth.nf4_dequantize.default,
         (packed, q, [5, 70], 64, torch.bfloat16, dynamic_code(device), absmax2, offset, 256)),
        (torch.ops.sloth.blockwise8_quantize.default, (absmax, dynamic_code(device), 256)),
        (torch.ops.sloth.mxfp4_quantize.default, (xm,)),
        (torch.ops.sloth.mxfp4_dequantize.default, (blocks, scales, torch.bfloat16)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in sample_calls(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_under_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def roundtrip(x, blocks, scales):
        packed, state = sloth.nf4_quantize(x, 64, compress_statistics=True)
        y = sloth.nf4_dequantize(packed, state, dtype=torch.float32)
        b, s = sloth.mxfp4_quantize(x)
        return y, sloth.mxfp4_dequantize(b, s, torch.float32), sloth.mxfp4_dequantize(blocks, scales)

    x = torch.randn(8, 64, device=device)
    blocks = torch.randint(0, 256, (4, 2, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(100, 140, (4, 2), dtype=torch.uint8, device=device)
    eager = roundtrip(x, blocks, scales)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x, blocks, scales)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_every_op_has_cpu_kernel_and_gpu_kernel_in_gpu_builds():
    from sloth import _build_config
    from sloth.info import op_backends

    table = op_backends()
    assert {"nf4_quantize", "nf4_dequantize", "blockwise8_quantize", "mxfp4_quantize", "mxfp4_dequantize"} <= set(table)
    for name, backends in table.items():
        assert "cpu" in backends, name
        if "cuda" in _build_config.BACKENDS:
            assert "cuda" in backends, name


def test_sloth_info_command():
    out = subprocess.run([sys.executable, "-m", "sloth", "info"], capture_output=True, text=True, check=True).stdout
    assert f"sloth:                {sloth.__version__}" in out
    assert "torch:" in out and "backends:" in out and "nf4_dequantize" in out


def test_hip_sources_in_sync_with_cuda():
    """csrc/hip is generated from csrc/cuda by csrc/hipify.py; a stale copy fails here."""
    if not (ROOT / "csrc" / "hipify.py").exists():
        pytest.skip("source tree not available")
    r = subprocess.run([sys.executable, str(ROOT / "csrc" / "hipify.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
