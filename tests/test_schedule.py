"""The warm-up + cosine schedule: its shape, per optimizer step, on a real optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from xraycls.model.schedule import warmup_cosine, warmup_cosine_factor


def _lrs(total_steps: int, peak: float = 1e-3, **kwargs: float) -> list[float]:
    """The lr each of `total_steps` optimizer steps runs at (then one past the end)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = warmup_cosine(optimizer, total_steps, **kwargs)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_shape_warmup_then_cosine() -> None:
    peak = 1e-3
    lrs = _lrs(100, peak=peak, warmup_ratio=0.25)
    assert lrs[0] == 0.0
    assert lrs[25] == pytest.approx(peak)  # warm-up end = ceil(100 * 0.25)
    assert lrs[10] == pytest.approx(peak * 10 / 25)  # linear warm-up
    assert lrs[25 + 75 // 2] == pytest.approx(peak / 2, rel=0.05)  # cosine midpoint
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert lrs[100] == min(lrs)
    warmup, decay = lrs[:26], lrs[25:]
    assert all(a < b for a, b in zip(warmup, warmup[1:], strict=False))
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_exact_midpoint_and_floor() -> None:
    factor = warmup_cosine_factor(120, warmup_ratio=0.25, min_lr_ratio=0.1)
    assert factor(30) == pytest.approx(1.0)
    assert factor(30 + 45) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert factor(120) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)  # steps past the estimate stay at the floor


def test_no_warmup_starts_at_peak() -> None:
    factor = warmup_cosine_factor(10, warmup_ratio=0.0)
    assert factor(0) == 1.0
    assert factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_each_param_group_keeps_its_own_peak() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.25}], lr=1.0)
    scheduler = warmup_cosine(optimizer, 8, warmup_ratio=0.5)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.0, 0.25])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "warmup_ratio": 1.5}, "warmup_ratio"),
        ({"total_steps": 10, "min_lr_ratio": -0.1}, "min_lr_ratio"),
    ],
)
def test_bad_settings_name_themselves(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        warmup_cosine_factor(**kwargs)
