"""EMA of the U-Net weights and the learning-rate warm-up."""

import pytest
import torch
from torch import nn

from ldm.training.ema import EMAModel, ema_decay_at
from ldm.training.lr_schedules import WarmupSchedule


def test_ema_tracks_the_exponential_average_with_warmup():
    model = nn.Linear(3, 2)
    ema = EMAModel(model, decay=0.9, warmup_steps=10)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(30):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ema.update_parameters(model)
        if step == 0:  # AveragedModel copies the weights on its first update
            expected = [p.detach().clone() for p in model.parameters()]
        else:
            decay = ema_decay_at(step, 0.9, 10)
            expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for averaged, wanted in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(averaged, wanted)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_decay_warms_up_then_caps():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_ema_rejects_a_decay_outside_zero_one():
    with pytest.raises(ValueError, match="decay"):
        EMAModel(nn.Linear(1, 1), decay=1.5)


def test_warmup_schedule_rises_linearly_then_decays_by_cosine():
    schedule = WarmupSchedule(warmup_steps=10, decay="cosine", total_steps=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1)
    assert WarmupSchedule(warmup_steps=4)(1000) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        WarmupSchedule(decay="cosine")
