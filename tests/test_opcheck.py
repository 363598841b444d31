"""``torch.library.opcheck`` over every registered op, from the one sample table (tests/op_samples.py): schemas
(mutation and aliasing declared), fake kernels (torch.compile), autograd registration, dynamic shapes."""

import pytest
import torch

import sloth  # noqa: F401  (registers the ops)
from conftest import DEVICES
from op_samples import registered_ops, samples

CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_every_op_has_samples():
    assert registered_ops() == set(samples("cpu")), "add the op's sample calls to tests/op_samples.py"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(registered_ops()))
def test_opcheck(op, device):
    for args in samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.sloth, op).default, args, test_utils=CHECKS)
