"""Tests marked `cuda` need a CUDA GPU: without one (torch.cuda.is_available() is False) they are skipped, in CI too.
Unlike the programs of tests/system_tools.py, which CI installs (so there a missing one fails), no CI machine of this
project has a GPU. On a machine with one: `python -m pytest tests/test_cuda.py -n 0`; bench/gpu_check.py is the
larger check (SD 1.5 and SDXL at their real sizes).

tests/conftest.py loads this module as a plugin; the marker is registered in pytest.ini.
"""

import pytest
import torch


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures touch CUDA
def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False); skipped here and in CI")
