import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from timing import format_table  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    table = format_table()
    if table:
        terminalreporter.write_sep("=", "sloth benchmark results (CUDA-event medians)")
        terminalreporter.write_line(table)
