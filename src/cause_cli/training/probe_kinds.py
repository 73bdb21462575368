"""Step three's variants, each registered once with what it needs, what it allows and what it
saves: how the cluster probe's centroids start (``--probe-init``, :data:`PROBE_STARTS`) and the
space they live in (``--probe-space``, :data:`PROBE_SPACES`).

The configuration names the accepted variants in config.PROBE_INITS and config.PROBE_SPACES
and checks names against them; step three looks each up here and never branches on a name. A
new variant is one entry (here, or registered from a module imported before training) and its
name in those tuples. What a variant saves is what it puts in the cluster probe it makes: the
centroids, a spread (``precision``), the space's whitening; the probe file records them, and
the names of the start and space that made them (cause_cli/trained.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import TrainConfig
from ..errors import CauseError
from ..model.heads import ClusterProbe
from ..model.kmeans import assign, consensus_kmeans, spherical_kmeans, unit_rows
from ..model.spread import AGREEMENT_THRESHOLD, fit_shared_spread, uses_spread
from ..model.whitening import FeatureWhitening
from ..registry import Registry

if TYPE_CHECKING:
    from .context import TrainingContext


@dataclass(frozen=True)
class ProbeSpace:
    """Where the centroids live. ``fit(context, sample)`` gives the whitening fitted on the
    sample of the teacher's features ``[N, r]`` (saved with the centroids, applied at
    inference), or None for the head's own space; ``reads_features``, it needs that sample."""

    fit: Callable[[TrainingContext, torch.Tensor | None], FeatureWhitening | None]
    reads_features: bool


@dataclass(frozen=True)
class ProbeStart:
    """How the centroids start. ``make(context, sample, whitening)`` gives the candidate probes
    (each with its own copy of the space's ``whitening``) from the sample of the teacher's
    features in the probe's space (None where neither the start nor the space reads one);
    where modularity refines them they learn side by side and the one of best modularity is
    kept. ``reads_features``, it needs the sample; ``consensus``, it takes --probe-consensus;
    ``spread``, it may give the clusters a spread (--probe-spread), kept only by a start that
    modularity does not refine (the Gaussians' means are not centroids that score by cosine)."""

    make: Callable[[TrainingContext, torch.Tensor | None, FeatureWhitening | None], list[ClusterProbe]]
    reads_features: bool
    consensus: bool = False
    spread: bool = False


PROBE_STARTS: Registry[ProbeStart] = Registry("cluster-probe start")
PROBE_SPACES: Registry[ProbeSpace] = Registry("cluster-probe space")


def check_probe_variants(config: TrainConfig) -> None:
    """The configured start and space are registered and allow what the configuration asks of
    them; one sentence if not (before step one: see TrainingContext)."""
    PROBE_SPACES[config.probe_space]
    start = PROBE_STARTS[config.probe_init]
    if config.probe_consensus and not start.consensus:
        takers = " or ".join(name for name, entry in PROBE_STARTS.items() if entry.consensus)
        raise CauseError(f"--probe-consensus needs a start that takes it (--probe-init {takers}).")
    if config.probe_spread == "on" and (config.refines_probe or not start.spread):
        spreads = " or ".join(name for name, entry in PROBE_STARTS.items() if entry.spread)
        raise CauseError(f"--probe-spread on needs a start that spreads (--probe-init {spreads}) without refinement.")


def whitened_space(context: TrainingContext, points: torch.Tensor | None) -> FeatureWhitening:
    assert points is not None
    whitening = FeatureWhitening.fit(points)
    context.run.log(f"cluster probe: whitening fitted on {len(points):,} tokens")
    return whitening


PROBE_SPACES.add("whitened", ProbeSpace(whitened_space, reads_features=True))
PROBE_SPACES.add("head", ProbeSpace(lambda context, points: None, reads_features=False))


def kmeans_start(context: TrainingContext, points: torch.Tensor, whitening: FeatureWhitening | None) -> ClusterProbe:
    """The cluster probe from spherical k-means of ``points [N, r]`` (in the probe's space):
    the consensus of the configured single-start fits, or the best of the configured restarts
    when the consensus is off; then, where the configured spread asks for it, equal Gaussians
    of one shared diagonal covariance fitted from that partition (model/spread.py)."""
    config = context.config
    assert config.probe_restarts is not None and config.probe_consensus is not None  # validate() resolved them
    restarts = config.probe_restarts
    generator = torch.Generator().manual_seed(config.seed)
    if config.probe_consensus:
        result = consensus_kmeans(points, context.num_classes, generator, config.probe_consensus)
        how = f"consensus of {config.probe_consensus} single-start fits (they agree on {result.agreement:.1%})"
    else:
        result = spherical_kmeans(points, context.num_classes, generator, restarts)
        how = f"best of {restarts} restarts"
    context.run.log(
        f"cluster probe: k-means start, {how}, mean cosine {result.mean_cosine:.4f} "
        f"after {result.iterations} iterations"
    )
    # Modularity refines centroids that score by cosine; a spread's means are not such centroids.
    spread = not config.refines_probe and uses_spread(config.probe_spread, result.agreement)
    probe = ClusterProbe(config.reduced_dim, context.num_classes, whitening, spread=spread)
    if not spread:
        probe.centroids.data.copy_(result.centroids)
        return probe
    unit = unit_rows(points)
    fitted = fit_shared_spread(unit, assign(unit, result.centroids)[0], context.num_classes)
    assert probe.precision is not None
    probe.centroids.data.copy_(fitted.means)
    probe.precision.copy_(fitted.precision)
    why = f" (the fits agree on less than {AGREEMENT_THRESHOLD:.0%})" if config.probe_spread == "auto" else ""
    context.run.log(f"cluster probe: Gaussians of one shared spread fitted from the k-means partition{why}")
    return probe


def kmeans_starts(
    context: TrainingContext, points: torch.Tensor | None, whitening: FeatureWhitening | None
) -> list[ClusterProbe]:
    assert points is not None
    return [kmeans_start(context, points, copy.deepcopy(whitening))]


PROBE_STARTS.add("kmeans", ProbeStart(kmeans_starts, reads_features=True, consensus=True, spread=True))


def random_starts(
    context: TrainingContext, points: torch.Tensor | None, whitening: FeatureWhitening | None
) -> list[ClusterProbe]:
    """The paper's start: centroids uniform in (-1/C, 1/C), one probe per restart, refined by
    modularity (config.refines_probe)."""
    config = context.config
    assert config.probe_restarts is not None  # validation resolved it
    return [
        ClusterProbe(config.reduced_dim, context.num_classes, copy.deepcopy(whitening))
        for _ in range(config.probe_restarts)
    ]


PROBE_STARTS.add("random", ProbeStart(random_starts, reads_features=False))
