"""sloth's CUDA allocator setting at import (sloth._allocator): expandable segments unless the user chose a setting,
on CUDA builds of torch only; the CUDA test checks, in a fresh process, that the segments really are expandable."""

import os
import subprocess
import sys

import pytest
import torch

from sloth import _allocator


@pytest.fixture
def cuda_build(monkeypatch):
    """A CUDA build of torch whose CUDA is not initialized yet, no allocator setting in the environment; returns the
    settings applied to a running allocator."""
    for k in (*_allocator._KEYS, "SLOTH_EXPANDABLE_SEGMENTS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    applied = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append, raising=False)
    return applied


def test_sets_environment_before_cuda_starts(cuda_build):
    assert _allocator.use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert cuda_build == []


def test_applies_to_running_allocator(cuda_build, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert _allocator.use_expandable_segments()
    assert cuda_build == ["expandable_segments:True"]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


@pytest.mark.parametrize("key", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_user_setting_wins(cuda_build, monkeypatch, key):
    monkeypatch.setenv(key, "max_split_size_mb:128")
    assert not _allocator.use_expandable_segments()
    assert os.environ[key] == "max_split_size_mb:128" and cuda_build == []
    assert key == "PYTORCH_CUDA_ALLOC_CONF" or "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_opt_out_and_other_builds(cuda_build, monkeypatch):
    monkeypatch.setenv("SLOTH_EXPANDABLE_SEGMENTS", "0")
    assert not _allocator.use_expandable_segments()
    monkeypatch.delenv("SLOTH_EXPANDABLE_SEGMENTS")
    monkeypatch.setattr(torch.version, "hip", "7.0", raising=False)  # ROCm
    assert not _allocator.use_expandable_segments()
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)  # CPU-only
    assert not _allocator.use_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and cuda_build == []


@pytest.mark.cuda
def test_segments_are_expandable_after_import():
    env = {k: v for k, v in os.environ.items() if k not in (*_allocator._KEYS, "SLOTH_EXPANDABLE_SEGMENTS")}
    code = ("import torch, sloth; x = torch.empty(1 << 24, device='cuda'); "
            "s = torch.cuda.memory_snapshot(); print(len(s), all(g['is_expandable'] for g in s))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, expandable = out.stdout.split()
    assert int(n) > 0 and expandable == "True"
