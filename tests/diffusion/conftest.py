"""One torch thread for the diffusion tests: their tensors are tiny, and on a busy 2-core machine
intra-op threads made the 1000-step DDPM runs ~50x slower (47 s vs 0.6 s)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
