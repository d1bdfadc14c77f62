"""The tiny model's builders: reproducible whatever else runs in the process."""

from __future__ import annotations

import threading
import time

import torch

from xray_train.testing.tiny import seeded


def _draws(seed: int, pause: float) -> list[torch.Tensor]:
    with seeded(seed):
        first = torch.randn(64)
        time.sleep(pause)  # another thread reseeding the global generator now must not change `second`
        second = torch.randn(64)
    return [first, second]


def test_seeded_draws_do_not_depend_on_other_threads():
    serial = {seed: _draws(seed, 0.0) for seed in (1, 2)}
    together: dict[int, list[torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda s=s: together.__setitem__(s, _draws(s, 0.2))) for s in (1, 2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the second starts while the first pauses inside its block
    for thread in threads:
        thread.join()
    for seed in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(serial[seed], together[seed]))
    assert not torch.equal(serial[1][0], serial[2][0])


def test_seeded_leaves_the_global_generator_as_it_was():
    torch.manual_seed(123)
    expected = torch.randn(8)
    torch.manual_seed(123)
    with seeded(7):
        torch.randn(100)
    assert torch.equal(torch.randn(8), expected)
