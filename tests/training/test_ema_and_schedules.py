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


def test_ema_averages_floating_buffers_copies_integer_ones_and_follows_a_dtype_move():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMAModel(model, decay=0.5, warmup_steps=1)
    model(torch.randn(8, 3))  # running statistics move, num_batches_tracked counts
    ema.update_parameters(model)  # the first update copies
    model(torch.randn(8, 3))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update_parameters(model)
    for key, value in model.state_dict().items():
        if value.is_floating_point():  # decay 0.5 after one update: the midpoint
            torch.testing.assert_close(ema.module.state_dict()[key], (before[key] + value) / 2)
        else:
            assert torch.equal(ema.module.state_dict()[key], value)
    model.double()  # keeps the Parameter objects: the update must read the moved tensors
    ema.module.double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update_parameters(model)
    assert ema.module[0].weight.dtype == torch.float64
    assert ema.n_averaged.item() == 3


def test_ema_leaves_shared_tensors_alone_and_rejects_a_changed_model():
    model = nn.Linear(3, 2)
    ema = EMAModel(model, decay=0.9)
    ema.module.bias = model.bias  # shared, as a LoRA copy shares its frozen base weights
    ema.update_parameters(model)
    averaged, current, _, _ = ema._tensor_pairs(model)
    assert ema.module.bias is model.bias
    assert [id(t) for t in averaged] == [id(ema.module.weight)] and [id(t) for t in current] == [id(model.weight)]
    with pytest.raises(ValueError, match="no longer match"):
        ema.update_parameters(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))


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
