"""How long the front door will take, from its first updates.

An update's cost grows with the concept bank (its term compares every anchor with every
entry), and the bank fills as training goes: each code's ring gains entries at its own pace
until it holds ``capacity``. So the first updates' pace alone underestimates the step. The
estimate fits ``seconds = a + b * entries`` to the first updates (those that did not run the
backbone, which only the first epochs may do), follows each code's ring at the pace it has
filled so far up to its capacity, and adds up the predicted updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Updates timed before the estimate is given, and the fewest it is fitted on.
UPDATES_BEFORE_ESTIMATE = 20
FEWEST_FITTED = 5
# Past this, on a CPU, the estimate says what would shorten the run.
LONG_RUN_SECONDS = 3600.0


@dataclass
class UpdateTimes:
    """Each timed update's seconds, the bank's entries while it ran and whether it ran the
    backbone (on images whose tokens were not cached yet)."""

    seconds: list[float] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    ran_backbone: list[bool] = field(default_factory=list)

    def add(self, seconds: float, entries: int, ran_backbone: bool = False) -> None:
        self.seconds.append(seconds)
        self.entries.append(entries)
        self.ran_backbone.append(ran_backbone)

    def fitted(self) -> tuple[np.ndarray, np.ndarray]:
        """The updates the cost is fitted on: those that did not run the backbone, when enough
        did not (with the cache, the backbone runs only until every image is in); else all."""
        seconds, entries = np.asarray(self.seconds), np.asarray(self.entries, dtype=np.float64)
        without = ~np.asarray(self.ran_backbone, dtype=bool)
        if without.sum() >= FEWEST_FITTED:
            return seconds[without], entries[without]
        return seconds, entries

    def cost_model(self) -> tuple[float, float]:
        """``(a, b)`` of ``seconds = a + b * entries`` by least squares (``b >= 0``)."""
        seconds, entries = self.fitted()
        slope = 0.0
        if np.ptp(entries) > 0:
            slope = max(0.0, float(np.polyfit(entries, seconds, 1)[0]))
        return float(seconds.mean() - slope * entries.mean()), slope


def predicted_entries(filled_per_code: np.ndarray, capacity: int, done: int, later: np.ndarray) -> np.ndarray:
    """The bank's entries after each of the updates numbered ``later`` (1-based), each code's
    ring filling at the pace it has after ``done`` updates, up to ``capacity``."""
    pace = filled_per_code.astype(np.float64) / max(1, done)
    return np.minimum(capacity, pace[None, :] * later[:, None]).sum(axis=1)


def front_door_seconds(
    times: UpdateTimes, filled_per_code: np.ndarray, capacity: int, done: int, total: int
) -> float | None:
    """Seconds the updates after the first ``done`` of ``total`` will take (None: too few timed)."""
    if len(times.fitted()[0]) < FEWEST_FITTED:
        return None
    base, per_entry = times.cost_model()
    later = np.arange(done + 1, total + 1)
    return float((base + per_entry * predicted_entries(filled_per_code, capacity, done, later)).sum())


def readable_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 20 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min"


def estimate_line(left: float, per_update_now: float, on_cpu: bool) -> str:
    """The line that says how long the front door will still take, with what would shorten
    it when that is over an hour on a CPU."""
    line = f"estimate: the front door needs about {readable_duration(left)} more ({per_update_now:.2f} s an update now)"
    if on_cpu and left > LONG_RUN_SECONDS:
        line += (
            "; a GPU (--device cuda), a smaller --resolution or fewer --min-updates (or --epochs-front-door) "
            "would shorten it"
        )
    return line
