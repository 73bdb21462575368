"""Training: the context every step shares, one module per step of CAUSE, and the run that
chains them (:func:`train`)."""

from ..trained import build_heads, load_heads
from .cluster_probe import train_cluster_probe
from .clusterbook import train_clusterbook
from .context import TrainingContext, seed_everything
from .front_door import train_front_door
from .pipeline import prepare, train

__all__ = [
    "TrainingContext",
    "build_heads",
    "load_heads",
    "prepare",
    "seed_everything",
    "train",
    "train_cluster_probe",
    "train_clusterbook",
    "train_front_door",
]
