import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
