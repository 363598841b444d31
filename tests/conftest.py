"""Shared test configuration: the `cuda` marker, and the devices every kernel test runs on."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

#: parametrize a test over these to run it on the CPU always and on the GPU where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
