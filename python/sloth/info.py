"""`sloth info`: what this installation of sloth carries and what it found."""

from __future__ import annotations

import platform

import torch

OPS = ("nf4_quantize", "nf4_dequantize", "blockwise8_quantize", "mxfp4_quantize", "mxfp4_dequantize")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # ROCm registers its kernels under the CUDA key


def op_backends() -> dict[str, list[str]]:
    """For each sloth op, the backends with a registered kernel."""
    import sloth  # noqa: F401  (loads the registrations)

    names = [s.split("::", 1)[1] for s in torch._C._dispatch_get_all_op_names() if s.startswith("sloth::")]
    gpu = "hip" if torch.version.hip else "cuda"
    table = {}
    for name in sorted(set(names)):
        table[name] = [
            (gpu if b == "cuda" else b)
            for b, key in _DISPATCH_KEYS.items()
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"sloth::{name}", key)
        ]
    return table


def collect() -> dict:
    """Everything `sloth info` prints, as a dict."""
    import sloth
    from sloth import _build_config as bc

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            arch = getattr(p, "gcnArchName", None) or f"sm_{p.major}{p.minor}"
            gpus.append(f"{p.name} ({arch}, {p.total_memory / 2**30:.0f} GiB)")
    return {
        "sloth": sloth.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "built against torch": bc.TORCH_VERSION,
        "backends": bc.BACKENDS,
        "architectures": bc.ARCHS,
        "cuda runtime": bc.CUDA_VERSION,
        "hip runtime": bc.HIP_VERSION,
        "gpus": gpus,
        "ops": op_backends(),
    }


def format_info(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "ops":
            continue
        if isinstance(v, list):
            v = ", ".join(v) if v else "none"
        lines.append(f"{k + ':':22s}{v if v is not None else '-'}")
    lines.append("ops:")
    for name, backends in info["ops"].items():
        lines.append(f"  {name:22s}{', '.join(backends)}")
    return "\n".join(lines)
