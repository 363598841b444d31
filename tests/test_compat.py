"""``import sloth`` refuses, in one line naming the fix, a torch that this build of the extension cannot load."""

import subprocess
import sys

from sloth import _build_config as bc
from sloth.compat import DISTRIBUTION, mismatch


def test_the_installed_torch_matches_this_build():
    import torch

    assert mismatch(bc.TORCH_VERSION, bc.CUDA_VERSION, bc.HIP_VERSION, torch.__version__, torch.version.cuda,
                    getattr(torch.version, "hip", None)) is None


def test_mismatches_are_one_line_naming_the_wheel():
    cases = [
        (("2.11.0+cu130", "13.0", None, "2.13.0+cpu", None, None), "built for torch 2.11 (CUDA 13.0)"),
        (("2.11.0+cu130", "13.0", None, "2.11.0+cu128", "12.8", None), "built for CUDA 13.0"),
        (("2.11.0+cu130", "13.0", None, "2.11.0+cpu", None, None), "without CUDA"),
        (("2.11.0", None, "7.1", "2.11.0+rocm6.4", None, "6.4.1"), "built for ROCm 7.1"),
    ]
    for args, expected in cases:
        why = mismatch(*args)
        assert why is not None and expected in why and DISTRIBUTION in why and "\n" not in why, (args, why)
    # same torch minor, another patch release or local tag: loads; a CPU build under a CUDA torch: loads
    assert mismatch("2.11.0+cu130", "13.0", None, "2.11.1+cu130", "13.2", None) is None
    assert mismatch("2.13.0+cpu", None, None, "2.13.0+cu130", "13.0", None) is None


def test_import_fails_with_the_line(tmp_path):
    """A build config from another torch: ``import sloth`` raises ImportError with the line, before the extension
    loads (run in a subprocess with a stand-in _build_config module)."""
    code = ("import sys, types, importlib.util\n"
            "fake = types.ModuleType('sloth._build_config')\n"
            "fake.TORCH_VERSION, fake.CUDA_VERSION, fake.HIP_VERSION, fake.BACKENDS, fake.ARCHS = "
            "'1.13.0', None, None, ['cpu'], []\n"
            "sys.modules['sloth._build_config'] = fake\n"
            "try:\n    import sloth\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR sloth: this sloth was built for torch 1.13" in out.stdout, out.stdout + out.stderr
