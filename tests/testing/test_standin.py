"""The stand-in's pretrained tower: what it is trained on, and that it is reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xray_train.testing.standin import TowerRecipe, _coverage_example, coverage_films, pretrain_tower


def test_coverage_targets_are_the_findings_pixels_and_never_a_mass():
    from xray_train.testing.synthetic import FINDING_KINDS

    recipe = TowerRecipe(n_films=12, film_scale=0.5)
    assert "mass" not in recipe.kinds and set(recipe.kinds) < set(FINDING_KINDS)
    pixels, coverage = coverage_films(recipe)
    assert pixels.shape == (12, 64, 64) and pixels.dtype == np.uint8
    assert coverage.shape == (12, 8, 8, len(recipe.kinds))
    assert 0 <= coverage.min() and coverage.max() <= 1
    assert coverage.sum() > 0  # some films have findings
    # Only the kinds drawn on a film are covered on it: redraw each film's spec and compare.
    from xray_train.testing.synthetic import sample_spec

    for i in range(12):
        rng = np.random.default_rng([recipe.seed, i])
        rng.integers(0, 3)  # the film size draw comes first
        spec = sample_spec(rng, kinds=recipe.kinds)
        drawn = {recipe.kinds.index(f.kind) for f in spec.findings}
        covered = {k for k in range(len(recipe.kinds)) if coverage[i, :, :, k].sum() > 0}
        assert covered <= drawn
    # Deterministic: the same film twice.
    a, b = _coverage_example((recipe.seed, 3, recipe)), _coverage_example((recipe.seed, 3, recipe))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_tower_pretraining_is_reproducible_and_learns(tmp_path, monkeypatch):
    recipe = TowerRecipe(n_films=24, steps=30, batch=8, film_scale=0.5)
    monkeypatch.setenv("XRAY_TRAIN_CACHE", str(tmp_path / "one"))
    state, record = pretrain_tower(recipe)
    assert record["final_loss"] < record["first_loss"]
    monkeypatch.setenv("XRAY_TRAIN_CACHE", str(tmp_path / "two"))
    again, record2 = pretrain_tower(recipe)
    assert record2["fingerprint_sha256"] == record["fingerprint_sha256"]
    other = pretrain_tower(dataclasses.replace(recipe, seed=recipe.seed + 1))[1]
    assert other["fingerprint_sha256"] != record["fingerprint_sha256"]
    # Cached by recipe: a second call reads the same weights back.
    cached_state, _ = pretrain_tower(recipe)
    assert all((cached_state[k] == again[k]).all() for k in again)


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_films_keep_the_benchmark_layout_at_any_scale(scale):
    pixels, _ = _coverage_example((1, 0, TowerRecipe(film_scale=scale)))
    # Padded to a square: the film is taller than wide, so the left and right columns are black.
    assert pixels[:, 0].max() == 0 and pixels[:, -1].max() == 0 and pixels[:, 32].max() > 0
