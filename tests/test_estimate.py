"""The front door's time estimate: from its first updates, with the concept bank still
filling, it predicts the whole step; a long run on a CPU is told what would shorten it."""

from __future__ import annotations

import numpy as np
import pytest

from cause_cli.training.estimate import (
    FEWEST_FITTED,
    UPDATES_BEFORE_ESTIMATE,
    UpdateTimes,
    estimate_line,
    front_door_seconds,
    predicted_entries,
    readable_duration,
)


def _filling_bank(updates: int, paces: np.ndarray, capacity: int) -> np.ndarray:
    """Entries per code after each update: code ``c`` gains ``paces[c]`` a step up to capacity."""
    steps = np.arange(1, updates + 1)[:, None]
    return np.minimum(capacity, np.floor(paces[None, :] * steps))


def test_the_estimate_follows_the_bank_as_it_fills():
    """Updates whose cost grows with the bank: the estimate from the first 20 is within 10 %
    of the real remainder, where the first updates' pace alone is far below it."""
    capacity, total = 100, 500
    paces = np.concatenate([np.full(60, 4.0), np.full(120, 0.5), np.full(40, 0.05)])
    entries = _filling_bank(total, paces, capacity).sum(axis=1)
    seconds = 0.15 + 3e-5 * entries  # the real cost of each update
    times = UpdateTimes()
    done = UPDATES_BEFORE_ESTIMATE
    for index in range(done):
        times.add(float(seconds[index]), int(entries[index - 1]) if index else 0)
    filled = _filling_bank(done, paces, capacity)[-1]
    predicted = front_door_seconds(times, filled, capacity, done, total)
    real = float(seconds[done:].sum())
    assert predicted is not None and abs(predicted - real) < 0.1 * real
    assert np.mean(times.seconds) * (total - done) < 0.8 * real


def test_updates_that_ran_the_backbone_are_left_out_of_the_fit():
    """With the cache, the first epochs run the backbone on images not cached yet: those
    updates would make the estimate a multiple of the truth."""
    times = UpdateTimes()
    for index in range(UPDATES_BEFORE_ESTIMATE):
        ran = index < 3
        times.add(5.0 if ran else 0.2, 1000, ran_backbone=ran)
    assert times.cost_model() == pytest.approx((0.2, 0.0))
    predicted = front_door_seconds(times, np.full(10, 100.0), 100, UPDATES_BEFORE_ESTIMATE, 120)
    assert predicted == pytest.approx(100 * 0.2)


def test_without_the_cache_every_update_counts():
    times = UpdateTimes()
    for _ in range(FEWEST_FITTED + 1):
        times.add(13.0, 500, ran_backbone=True)
    assert front_door_seconds(times, np.full(5, 100.0), 100, FEWEST_FITTED + 1, 106) == pytest.approx(100 * 13.0)


def test_too_few_updates_give_no_estimate():
    times = UpdateTimes()
    for _ in range(FEWEST_FITTED - 1):
        times.add(1.0, 10)
    assert front_door_seconds(times, np.ones(3), 100, FEWEST_FITTED - 1, 100) is None


def test_each_code_fills_at_its_pace_up_to_capacity():
    filled = np.array([50.0, 5.0, 0.0])  # after 10 updates
    later = np.array([11, 20, 1000])
    assert predicted_entries(filled, 100, 10, later).tolist() == [55 + 5.5, 100 + 10, 100 + 100]


def test_a_long_run_on_a_cpu_is_told_what_would_shorten_it():
    short = estimate_line(600, 1.2, on_cpu=True)
    assert short == "estimate: the front door needs about 10 min more (1.20 s an update now)"
    long = estimate_line(4 * 3600 + 600, 30.0, on_cpu=True)
    assert "4 h 10 min" in long and "a GPU (--device cuda), a smaller --resolution or fewer --min-updates" in long
    assert "GPU" not in estimate_line(4 * 3600, 30.0, on_cpu=False)


@pytest.mark.parametrize(("seconds", "said"), [(45, "45 s"), (600, "10 min"), (5400, "1 h 30 min")])
def test_durations_read_as_people_say_them(seconds, said):
    assert readable_duration(seconds) == said


def test_training_says_how_long_the_front_door_will_take(tmp_path):
    from cause_cli.config import TrainConfig
    from cause_cli.data.synthetic import write_scenes
    from cause_cli.training import train

    scenes = write_scenes(tmp_path / "scenes", num_train=8, num_val=2, seed=3, size_range=(64, 72))
    config = TrainConfig(data_dir=str(scenes), resolution=64, clusterbook_size=16, projection_dim=32, batch_size=4,
                         epochs_front_door=12, min_updates=0)  # fmt: skip
    train(config, tmp_path / "run", "cpu")
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    (estimate,) = [line for line in lines if "estimate: the front door needs about" in line]
    front_door_done = next(index for index, line in enumerate(lines) if "step 2/3 front door: done in" in line)
    assert lines.index(estimate) < front_door_done
