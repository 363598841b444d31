"""The CUDA allocator setting of sloth's offloaded checkpointing (sloth.runtime.allocator): expandable segments, applied
to the running allocator without touching the environment, unless the user chose a setting; CUDA builds of torch
only. The CUDA test checks, in a fresh process, that segments allocated afterwards really are expandable."""

import os
import subprocess
import sys

import pytest
import torch

from sloth.runtime import allocator as _allocator


@pytest.fixture
def cuda_build(monkeypatch):
    """A CUDA build of torch, no allocator setting in the environment, nothing applied yet; returns the settings
    handed to torch's setter."""
    for k in (*_allocator._KEYS, "SLOTH_EXPANDABLE_SEGMENTS"):
        monkeypatch.setenv(k, "")  # (setenv: restored afterwards, unlike delenv of an unset variable)
        monkeypatch.delenv(k)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(_allocator, "_applied", [])
    applied = []
    monkeypatch.setattr(_allocator, "_setter", lambda: applied.append)
    return applied


def test_applied_once_without_touching_environment(cuda_build):
    env = dict(os.environ)
    assert _allocator.use_expandable_segments()
    assert _allocator.use_expandable_segments()  # already on: not applied again
    assert cuda_build == ["expandable_segments:True"]
    assert dict(os.environ) == env


@pytest.mark.parametrize("key", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_user_setting_wins(cuda_build, monkeypatch, key):
    monkeypatch.setenv(key, "max_split_size_mb:128")
    assert not _allocator.use_expandable_segments()
    assert cuda_build == []


@pytest.mark.parametrize("case", ["opt-out", "rocm", "cpu-only", "no-setter", "setter-raises"])
def test_not_applied(cuda_build, monkeypatch, case):
    if case == "opt-out":
        monkeypatch.setenv("SLOTH_EXPANDABLE_SEGMENTS", "false")
    elif case == "rocm":
        monkeypatch.setattr(torch.version, "hip", "7.0", raising=False)
    elif case == "cpu-only":
        monkeypatch.setattr(torch.version, "cuda", None)
    elif case == "no-setter":
        monkeypatch.setattr(_allocator, "_setter", lambda: None)
    else:
        def raising(setting):
            raise RuntimeError("unknown allocator option")

        monkeypatch.setattr(_allocator, "_setter", lambda: raising)
    assert not _allocator.use_expandable_segments()
    assert cuda_build == [] and not _allocator._applied


def test_sloth_checkpointing_applies_it(cuda_build):
    """use_gradient_checkpointing="sloth" turns it on; Transformers' own checkpointing does not."""
    import sloth
    from test_transformers_integration import make_model

    model = make_model("llama")
    sloth.set_gradient_checkpointing(model, True)
    assert cuda_build == []
    sloth.set_gradient_checkpointing(model, "sloth")
    assert cuda_build == ["expandable_segments:True"]


@pytest.mark.cuda
def test_segments_are_expandable_afterwards():
    env = {k: v for k, v in os.environ.items() if k not in (*_allocator._KEYS, "SLOTH_EXPANDABLE_SEGMENTS")}
    code = ("import torch, sloth; from sloth.runtime.allocator import use_expandable_segments as u; "
            "a = torch.empty(1 << 20, device='cuda'); assert u(); b = torch.empty(1 << 26, device='cuda'); "
            "s = torch.cuda.memory_snapshot(); print(sum(g['is_expandable'] for g in s), len(s))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expandable, n = map(int, out.stdout.split())
    assert n >= 2 and expandable >= 1  # the segment of a (made before) stays; b's is expandable
