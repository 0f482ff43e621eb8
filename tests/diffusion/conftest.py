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


def linear_fake_model(seed: int):
    """A fixed linear function of x (B, 2, 4, 4) and t (a scalar from diffusers, (B,) from ldm), its coefficients
    drawn from ``seed``: the same model for a reference scheduler and for ldm's sampler."""
    coefficients = torch.Generator().manual_seed(seed)
    slope = 0.5 + 0.4 * torch.rand(2, 1, 1, generator=coefficients)
    time_pattern = 0.5 * torch.randn(2, 4, 4, generator=coefficients)
    offset = 0.3 * torch.randn(2, 4, 4, generator=coefficients)

    def fake_model(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return slope * x + time_pattern * (t / 1000) + offset

    return fake_model


def initial_noise():
    """The starting noise (3, 2, 4, 4) the reference comparisons share."""
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
