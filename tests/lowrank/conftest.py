import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small linear algebra runs far faster on one thread of a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
