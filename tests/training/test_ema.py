"""The EMA kept beside training weights: its decay by hand, with and without the warm-up cap."""

import torch

from flashstep.training.checkpointing import EMA


def _module(value: float) -> torch.nn.Module:
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(value)
    return module


def test_the_warm_up_caps_the_decay_so_a_short_run_averages_the_same_whatever_the_decay():
    weights = _module(1.0)
    slow, slower = EMA(_module(0.0), 0.995), EMA(_module(0.0), 0.999)
    for step in range(3):
        slow.update(weights, step)
        slower.update(weights, step)
    # d = 1/10, 2/11, 3/12: the average keeps 0.1 * 2/11 * 1/4 of its start.
    expected = 1 - 0.1 * (2 / 11) * 0.25
    assert torch.allclose(slow.module.weight, torch.tensor([[expected]]))
    assert torch.equal(slow.module.weight, slower.module.weight)


def test_without_the_warm_up_the_average_keeps_decay_to_the_power_of_steps_of_its_start():
    weights = _module(1.0)
    ema = EMA(_module(0.0), 0.9, warmup=False)
    for step in range(3):
        ema.update(weights, step)
    assert torch.allclose(ema.module.weight, torch.tensor([[1 - 0.9**3]]))
    assert not ema.module.weight.requires_grad
