"""The op library itself: schemas, fake kernels under torch.compile, `sloth info`, hipify sync (opcheck of every op:
test_opcheck.py)."""

import pathlib
import subprocess
import sys

import pytest
import torch

import sloth

from conftest import DEVICES

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
