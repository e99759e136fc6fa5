"""pretrain.memory's activation meter on plain autograd graphs whose saved tensors are known."""

from __future__ import annotations

import torch

from pretrain.memory import ActivationMeter


def test_activation_meter_counts_saved_storages_once_and_releases_them():
    lin = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256)
    with ActivationMeter(lin) as meter:
        h = lin(x)  # saves x (64 KiB); the weight is a parameter and not counted
        y = torch.tanh(h)  # saves its output y (64 KiB)
        z = y * y  # saves y twice: the same storage, counted once
        assert meter.current == 2 * 64 * 256 * 4
        z.sum().backward()
        del x, h, y, z  # the graph and the last references go: nothing saved is alive
    assert meter.peak == 2 * 64 * 256 * 4
    assert meter.current == 0


def test_activation_meter_peak_follows_what_is_alive():
    """Two graphs one after the other: the peak is one graph's, not the sum (the second is
    built after the first was freed)."""
    lin = torch.nn.Linear(128, 128, bias=False)
    with ActivationMeter(lin) as meter:
        for _ in range(2):
            x = torch.randn(32, 128)
            torch.tanh(lin(x)).sum().backward()
            del x
    assert meter.peak == 2 * 32 * 128 * 4  # x and tanh's output
    assert meter.current == 0
