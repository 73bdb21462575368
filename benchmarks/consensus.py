"""The consensus start of the cluster probe: the vote table against the written-out votes.

Step three's default fits spherical k-means 16 times and clusters every token's 16 one-hot
assignments (``model/kmeans.py: consensus_of``). Written out, those votes are ``N x 16C``
floats: 173 MB at C = 27 and 1.1 GB at C = 171 for the 100,000 tokens step three samples.
The toolkit's :class:`~cause_cli.model.kmeans.Votes` keeps the ``N x 16`` ids instead. For
each case this runs both on the same partitions in the same process, checks that they give
the same consensus labels, and prints the times, the peak memory and their ratios.

    python benchmarks/consensus.py                       # 100,000 points, C = 27; 25,000, C = 171
    python benchmarks/consensus.py --cases 100000:171    # the paper's largest C at full size (minutes)

The partitions are noisy copies of one hidden partition (ids shuffled, 30 % of points
relabelled at random), as fits of one space disagree on the points between clusters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steps import cpu_peak_growth

from cause_cli.model.kmeans import Votes, assign, spherical_kmeans

FITS = 16
RESTARTS = 8  # as consensus_of


def partitions_of(points: int, ids: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randint(ids, (points,), generator=generator)
    found = []
    for _ in range(FITS):
        relabelled = torch.randperm(ids, generator=generator)[hidden]
        noise = torch.rand(points, generator=generator) < 0.3
        found.append(torch.where(noise, torch.randint(ids, (points,), generator=generator), relabelled))
    return found


def written_out(partitions: list[torch.Tensor], ids: int) -> torch.Tensor:
    """Spherical k-means of the explicit one-hot votes, as the consensus was computed before."""
    votes = torch.cat([F.one_hot(partition, ids).float() for partition in partitions], dim=1)
    together = spherical_kmeans(votes, ids, torch.Generator().manual_seed(1), restarts=RESTARTS)
    return assign(F.normalize(votes, dim=1), together.centroids)[0]


def vote_table(partitions: list[torch.Tensor], ids: int) -> torch.Tensor:
    return Votes(partitions, ids).kmeans(ids, torch.Generator().manual_seed(1), restarts=RESTARTS)[0]


def measured(form, partitions: list[torch.Tensor], ids: int) -> tuple[torch.Tensor, float, int]:
    result: list[torch.Tensor] = []
    started = time.perf_counter()
    peak = cpu_peak_growth(lambda: result.append(form(partitions, ids)))
    return result[0], time.perf_counter() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["100000:27", "25000:171"], help="POINTS:CLUSTERS")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for case in args.cases:
        points, ids = (int(part) for part in case.split(":"))
        partitions = partitions_of(points, ids)
        dense_labels, dense_time, dense_peak = measured(written_out, partitions, ids)
        table_labels, table_time, table_peak = measured(vote_table, partitions, ids)
        same = float((dense_labels == table_labels).float().mean())
        print(
            f"consensus  N={points:,} C={ids} {FITS} fits, {RESTARTS} restarts: written-out votes "
            f"{dense_time:.1f} s, {dense_peak / 2**20:.0f} MiB; vote table {table_time:.1f} s, "
            f"{table_peak / 2**20:.0f} MiB (x{dense_time / table_time:.1f} faster, "
            f"1/{dense_peak / max(table_peak, 1):.0f} of the memory); same labels for {same:.2%} of points",
            flush=True,
        )


if __name__ == "__main__":
    main()
