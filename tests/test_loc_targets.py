"""Distance-aware <loc> targets (training.loc_label_sigma, loc_l1_weight) and expected-coordinate decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xray_train.generate import ExpectedLocProcessor
from xray_train.loss import LocTargets

VOCAB, FIRST, BINS = 1200, 100, 1024


def _logits_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, VOCAB, generator=g) * 3
    labels = torch.tensor([5, FIRST + 10, 77, FIRST + 1023, FIRST, 99])
    return logits, labels


@pytest.mark.parametrize("sigma, l1", [(12.0, 0.0), (0.0, 2.0), (20.0, 1.0)])
def test_positions_that_are_not_loc_keep_the_plain_cross_entropy(sigma, l1):
    logits, labels = _logits_and_labels()
    loc = LocTargets(FIRST, BINS, sigma, l1)
    rows = loc.row_losses(logits, labels)
    plain = F.cross_entropy(logits, labels, reduction="none")
    not_loc = torch.tensor([True, False, True, False, False, True])
    torch.testing.assert_close(rows[not_loc], plain[not_loc])
    assert not torch.allclose(rows[~not_loc], plain[~not_loc])
    # ... and their gradients too.
    x = logits.clone().requires_grad_(True)
    loc.row_losses(x, labels)[not_loc].sum().backward()
    y = logits.clone().requires_grad_(True)
    F.cross_entropy(y, labels, reduction="none")[not_loc].sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_a_narrow_gaussian_is_the_one_hot_loss_and_a_wide_one_rewards_near_misses():
    logits, labels = _logits_and_labels()
    plain = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(LocTargets(FIRST, BINS, 0.05).row_losses(logits, labels), plain)
    # Mass on bins 500-510 (just off the truth 511) vs. on 890-900: the smoothed loss prefers the near
    # miss, the one-hot loss cannot tell them apart.
    target = torch.tensor([FIRST + 511])
    near, far = torch.zeros(1, VOCAB), torch.zeros(1, VOCAB)
    near[0, FIRST + 500 : FIRST + 511] = far[0, FIRST + 890 : FIRST + 901] = 20.0
    smooth = LocTargets(FIRST, BINS, 12.0)
    assert smooth.row_losses(near, target) < smooth.row_losses(far, target) - 3
    torch.testing.assert_close(F.cross_entropy(near, target), F.cross_entropy(far, target))


def test_l1_term_is_the_distance_of_the_expected_coordinate():
    logits = torch.full((1, VOCAB), -1e4)
    logits[0, FIRST + 100] = logits[0, FIRST + 300] = 0.0  # expectation: bin 200
    logits[0, 3] = 5.0  # a non-loc token does not enter the expectation
    label = torch.tensor([FIRST + 250])
    with_l1 = LocTargets(FIRST, BINS, 0.0, l1_weight=2.0).row_losses(logits, label)
    without = F.cross_entropy(logits, label, reduction="none")
    torch.testing.assert_close(with_l1 - without, torch.tensor([2.0 * 50 / 1023]), rtol=1e-3, atol=1e-3)


def test_from_ids_is_off_without_levers_and_refuses_gaps():
    assert LocTargets.from_ids(list(range(10, 20)), 0.0, 0.0) is None
    assert LocTargets.from_ids(None, 12.0, 1.0) is None
    assert LocTargets.from_ids(list(range(10, 20)), 3.0, 0.0) == LocTargets(10, 10, 3.0, 0.0)
    with pytest.raises(ValueError):
        LocTargets.from_ids([10, 11, 13], 3.0, 0.0)


def test_expected_decoding_picks_the_mean_bin_only_when_a_loc_token_wins():
    proc = ExpectedLocProcessor(list(range(FIRST, FIRST + BINS)))
    scores = torch.full((2, VOCAB), -30.0)
    # Row 0: a loc token wins (bin 300, the mode), but the mass is spread to bin 400: expectation 340.
    scores[0, FIRST + 300] = 1.0
    scores[0, FIRST + 400] = 1.0 + torch.log(torch.tensor(2 / 3))
    # Row 1: a text token wins; loc scores are ignored.
    scores[1, 7] = 5.0
    scores[1, FIRST + 50] = 4.0
    out = proc(None, scores.clone())
    assert int(out[0].argmax()) == FIRST + 340
    assert int(out[1].argmax()) == 7
    torch.testing.assert_close(out[1], scores[1])
