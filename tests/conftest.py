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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is as fast, and does not stall when the 2 cores are shared (OpenMP
    threads waiting on a descheduled sibling made the tiny-model tests 10x slower on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The bundled instruction tokenizer of ``sloth finetune`` (built on the fly, no download)."""
    from sloth.finetune.data import bundled_data_path
    from sloth.finetune.tokenizer import bundled_tokenizer

    return bundled_tokenizer(str(tmp_path_factory.mktemp("tok")), bundled_data_path())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random-weight checkpoints (with a tokenizer) of every supported family: {family: path}."""
    from tiny_checkpoints import FAMILIES, save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_checkpoint(f, root / f) for f in FAMILIES}
