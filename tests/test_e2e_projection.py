"""The end-to-end benchmark's 100k projection, which the README's speed headline comes from: every row's
training rate is taken by the same rule, so xray-train and its peers are compared like for like."""

from __future__ import annotations

import pytest

from .conftest import benchmark

bench = benchmark("bench_e2e")
FILMS = 224  # 14 steps of 16
RATE = 38.0  # samples/s of a typical step


def _steps(first_done: float, every: float, n: int, per_step: int = 16, outliers: dict | None = None):
    """``[step, seconds after start, samples]`` as a peer's log reports them; ``outliers`` adds seconds to steps."""
    out, t = [], first_done
    for step in range(1, n + 1):
        if step > 1:
            t += every + (outliers or {}).get(step, 0.0)
        out.append([step, round(t, 3), per_step])
    return out


def _peer(name: str, steps: list, fixed: float = 22.0) -> dict:
    train = steps[-1][1] - fixed
    return {"name": name, "phase": "phase1", "films": FILMS, "samples": FILMS, "batch": steps[0][2],
            "stages": {"start_up": 20.0, "batch_search": 9.0, "train": train, "save": 1.0, "other": 1.0},
            "samples_per_s_training_steps": round(FILMS / train, 3), "steps_reported": steps}


def test_steady_rate_leaves_out_compiles_and_reads_the_log():
    # Unsloth's pattern: step 2 and the last step recompile.
    log = "".join(f"bench: step {s} done {t} s after start, {n} samples\n"
                  for s, t, n in _steps(140.0, 1.4, 14, outliers={2: 85.0, 14: 144.0}))
    steps = bench.reported_steps(log)
    assert len(steps) == 14
    assert bench.steady_rate(steps) == pytest.approx(16 / 1.4, rel=1e-3)
    # The plain average over the same steps, which the projection must not use, is far slower.
    assert (steps[-1][1] - steps[0][1]) / 13 > 2 * 1.4


def test_steady_rate_needs_three_steps_with_their_samples():
    assert bench.steady_rate(_steps(10.0, 1.0, 2)) is None
    assert bench.steady_rate([[1, 10.0, None], [2, 11.0, None], [3, 12.0, None]]) is None
    assert bench.reported_steps("bench: step 3 done 12 s after start") == [[3, 12.0, None]]


def test_steady_split_moves_time_beyond_the_typical_step_into_warm_up():
    row = _peer("unsloth", _steps(140.0, 16 / RATE, 14, outliers={2: 85.0}))
    split = bench.steady_split(row)
    assert split["samples_per_s_training_steps"] == pytest.approx(RATE, rel=1e-3)
    assert split["stages"]["train"] == pytest.approx(FILMS / RATE, abs=0.05)
    assert split["stages"]["train"] + split["stages"]["warm_up"] == pytest.approx(row["stages"]["train"], abs=0.02)
    assert split["samples_per_s_training_mean"] == row["samples_per_s_training_steps"]


def test_projection_treats_xray_train_and_a_peer_alike():
    # The same fixed costs (start-up, save, other, 35 s of compiles and first batches) and the same typical
    # step: the same projected hours, whichever trainer the row is.
    typical = 16 / RATE
    peer = bench.steady_split(_peer("trl", _steps(22.0 + 35.0 + typical, typical, 14)))
    xray = {
        "name": "xray-train phase1 first run", "phase": "phase1", "films": FILMS, "epochs": 1.0,
        "validation_films": 0, "eval_batch": 16, "samples_per_s_training_steps": RATE, "cache_build": None,
        "cache_films_per_s": None,
        "stages": {"start_up": 20.0, "data_read": 0.0, "cache_build": 0.0, "compile": 30.0,
                   "train": FILMS / RATE + 5.0, "eval": 0.0, "save": 1.0, "other": 1.0},
    }
    out = bench.projection([xray, peer])
    assert out["trl"]["first_epoch_h"] == pytest.approx(out[xray["name"]]["first_epoch_h"], abs=0.01)
    assert out[xray["name"]]["x_best_peer"] == pytest.approx(1.0, abs=0.02)


def test_fastest_peer_row_counts_also_at_another_batch_and_a_stopped_one():
    slow = bench.steady_split(_peer("unsloth", _steps(140.0, 1.4, 14)))
    fast = bench.steady_split(_peer("unsloth", _steps(140.0, 2.0, 10, per_step=24)))
    fast["name"] = "unsloth, batch 24"
    stopped = {"name": "trl", "phase": "phase1", "error": "stopped", "steps_reported": _steps(300.0, 2.0, 5)}
    seed = bench.steady_split(_peer("seed", _steps(30.0, 1.1, 28, per_step=8)))
    xray = {"name": "xray-train phase1 first run", "phase": "phase1", "films": FILMS, "validation_films": 0,
            "samples_per_s_training_steps": RATE, "cache_build": None, "cache_films_per_s": None,
            "stages": {"start_up": 20.0, "data_read": 0.0, "cache_build": 0.0, "compile": 30.0,
                       "train": FILMS / RATE, "eval": 0.0, "save": 1.0, "other": 1.0}}
    out = bench.projection([slow, fast, stopped, seed, xray])
    assert bench.is_peer("unsloth, batch 24") and not bench.is_peer("seed")
    # Stopped after 5 steps at 8 samples/s: its time up to the first step is fixed, the rest at that rate.
    assert out["trl"]["from_steps_reported"] == {"samples_per_s": 8.0, "fixed_s": 300.0}
    assert out["trl"]["first_epoch_h"] == pytest.approx((300.0 + bench.PROJECTION_FILMS / 8.0) / 3600, abs=0.01)
    assert out["unsloth, batch 24"]["first_epoch_h"] < out["unsloth"]["first_epoch_h"]
    best = out["unsloth, batch 24"]["first_epoch_h"] / out[xray["name"]]["first_epoch_h"]
    assert out[xray["name"]]["x_best_peer"] == pytest.approx(best, abs=0.02)
    assert out[xray["name"]]["x_seed"] == pytest.approx(out["seed"]["first_epoch_h"] / out[xray["name"]]["first_epoch_h"],
                                                        abs=0.02)
