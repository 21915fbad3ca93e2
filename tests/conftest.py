"""One torch thread per test process: the suite runs as ``pytest -n 2`` on 2 cores, and more
threads than cores make small-tensor work many times slower."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
