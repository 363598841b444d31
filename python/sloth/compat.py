"""Whether the installed torch can load this build of ``sloth._C``, checked at ``import sloth`` before the
extension loads, so that a mismatch is one line that names the fix instead of an opaque "undefined symbol".

The extension is compiled against libtorch's C++ API, which changes between torch minor releases: a build serves
the torch major.minor it was built against (the wheel's metadata pins it), with the same accelerator runtime
(CUDA major, ROCm major.minor). A CPU-only build runs under any accelerator build of that torch (CPU kernels
only; ``sloth info`` says so).
"""

from __future__ import annotations

from typing import Optional

#: the name sloth's wheels are published under (the import name stays ``sloth``)
DISTRIBUTION = "sloth-kernels"


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _major(version: Optional[str]) -> Optional[str]:
    return version.split(".")[0] if version else None


def mismatch(built_torch: str, built_cuda: Optional[str], built_hip: Optional[str], torch_version: str,
             cuda: Optional[str], hip: Optional[str]) -> Optional[str]:
    """Why a build (torch / CUDA / HIP versions it was built against) cannot load under the installed torch, or
    None when it can."""
    runtime = f"CUDA {built_cuda}" if built_cuda else f"ROCm {built_hip}" if built_hip else "CPU"
    have = f"torch {torch_version}"
    fix = (f"install the {DISTRIBUTION} wheel built for it, or build sloth against it from source: "
           f"pip install --no-build-isolation {DISTRIBUTION}")
    if _minor(built_torch) != _minor(torch_version):
        return f"this sloth was built for torch {_minor(built_torch)} ({runtime}), this Python has {have}: {fix}"
    if built_cuda and _major(built_cuda) != _major(cuda):
        return (f"this sloth was built for CUDA {built_cuda}, this Python has {have} "
                f"({'CUDA ' + cuda if cuda else 'without CUDA'}): {fix}")
    if built_hip and _minor(built_hip) != _minor(hip or ""):
        return (f"this sloth was built for ROCm {built_hip}, this Python has {have} "
                f"({'ROCm ' + hip if hip else 'without ROCm'}): {fix}")
    return None


def check() -> None:
    """Raise ImportError with one line when the installed torch cannot load this build (see :func:`mismatch`)."""
    import torch

    from . import _build_config as bc

    why = mismatch(bc.TORCH_VERSION, bc.CUDA_VERSION, bc.HIP_VERSION, torch.__version__, torch.version.cuda,
                   getattr(torch.version, "hip", None))
    if why:
        raise ImportError(f"sloth: {why}")
