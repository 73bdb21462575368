"""The typed configuration of a training run; its defaults are METHOD.md section 5."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CauseError

HEADS = ("mlp", "tr")
PROBE_INITS = ("kmeans", "random")
PROBE_SPACES = ("whitened", "head")
PROBE_SPREADS = ("auto", "on", "off")
PROBE_UPSAMPLINGS = ("scores", "features")
FEATURE_CACHE_CHOICES = ("auto", "on", "off")
# Settings a finished or interrupted run may be continued with other values of: how fast it
# goes and where, not what it learns (the feature cache keeps tokens in float16, which is as
# close as mixed precision).
SETTINGS_THAT_CHANGE_NOTHING_LEARNT = frozenset(
    {"workers", "checkpoint_seconds", "precision", "cache_features", "extra"}
)
# Restarts of the cluster probe when none are asked for: k-means restarts are cheap; the
# paper's random start is one.
DEFAULT_PROBE_RESTARTS = {"kmeans": 8, "random": 1}
# Single-start k-means fits whose consensus starts the cluster probe by default: where classes
# differ only in texture, one fit's partition hinges on which of many near-equal optima it
# lands in, the consensus of 16 does not (docs/quality.md).
DEFAULT_PROBE_CONSENSUS = 16
RECIPES = ("default", "reference")
# The reference fits the cluster probe for 1 epoch after the MLP head and 5 after the TR head.
CLUSTER_PROBE_EPOCHS = {"mlp": 1, "tr": 5}
# The paper's epochs for the clusterbook and the front door.
PAPER_EPOCHS = {"clusterbook": 1, "front_door": 2}
# Optimiser updates the front door (and a cluster probe refined by modularity) gets at least
# on data other than the paper's datasets: the paper's epochs are 7,000+ updates on COCO-Stuff
# but a few dozen on a folder of 300 images. The clusterbook keeps the paper's one epoch: more
# updates collapse it onto a few dozen of its codes, which then mix classes (docs/quality.md).
DEFAULT_MIN_UPDATES = 500
SCHEDULED_STEPS = ("clusterbook", "front_door", "cluster_probe")
RAISED_STEPS = ("front_door", "cluster_probe")
# Concept similarity above which two tokens are positives, below which negatives: the paper's
# (set for DINO on its datasets), and stricter ones for other data (docs/quality.md).
PAPER_THRESHOLDS = (0.3, 0.1)
FOLDER_THRESHOLDS = (0.5, 0.3)


@dataclass
class TrainConfig:
    """Everything that decides what a run computes. Saved as ``config.json`` in the run."""

    data_dir: str
    dataset: str = "folder"
    backbone: str = "toy"
    # How position embeddings are resized to the input's grid: "reference" (the reference code's
    # rule for the backbone, so heads match reference-trained ones) or "timm".
    pos_embed: str = "reference"
    head: str = "mlp"
    resolution: int | None = None  # None: the backbone's resolution
    num_classes: int | None = None  # clusters of the cluster probe; None: from the dataset
    clusterbook_size: int = 2048
    reduced_dim: int = 90
    projection_dim: int = 2048
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    # Epochs of each step; None: the paper's (1 / 2 / 1 for MLP or 5 for TR), the front door's
    # and a refined cluster probe's raised on data other than the paper's datasets until the
    # step makes at least ``min_updates`` updates.
    epochs_clusterbook: int | None = None
    epochs_front_door: int | None = None
    epochs_cluster_probe: int | None = None
    min_updates: int = DEFAULT_MIN_UPDATES
    grid_sampling: bool = True
    grid_window: int = 4
    modularity_temperature: float = 0.1
    contrastive_temperature: float = 0.07
    # None: the paper's 0.3 / 0.1 on the paper's datasets, FOLDER_THRESHOLDS on other data.
    positive_threshold: float | None = None
    negative_threshold: float | None = None
    bank_capacity: int = 100
    use_bank: bool = True
    ema_momentum: float = 0.99
    dropout: float = 0.1
    seed: int = 0
    val_fraction: float = 0.2
    workers: int | None = None  # image-loading processes; None: devices.loader_workers decides
    # "default": labels reach nothing but the linear probe. "reference": the reference code's
    # recipe exactly (see apply_reference_recipe), label leak included.
    recipe: str = "default"
    reference_gpus: int = 4  # the reference's process count, which its recipe depends on
    front_door_resolution: int | None = None  # steps two and three; None: the run's resolution
    epoch_fraction: float = 1.0  # share of each epoch's batches a step trains on
    # How the cluster probe starts: "kmeans" (spherical k-means on the teacher's features, no
    # labels) or "random" (the paper's uniform start, refined by modularity).
    probe_init: str = "kmeans"
    # Whether k-means centroids are then refined by the paper's modularity objective (a random
    # start always is).
    probe_refine: bool = False
    # Where the cluster probe's centroids live: "whitened" (the teacher's features whitened by
    # a fit on the training split, no labels) or "head" (the teacher's features, the paper's).
    probe_space: str = "whitened"
    # Starts of the cluster probe: k-means restarts ranked by mean cosine, or random starts
    # trained side by side and ranked by modularity. None: 8 for k-means, 1 for random.
    probe_restarts: int | None = None
    # With the k-means start: the consensus of this many single-start fits (0: the restart of
    # best mean cosine instead). None: DEFAULT_PROBE_CONSENSUS, or 0 where --probe-restarts
    # was given (asking for restarts asks for the best of them). docs/quality.md says why.
    probe_consensus: int | None = None
    # Whether the k-means start's clusters get a spread (model/spread.py): "auto" where the
    # consensus' fits agree on less than 85 % of the points, "on" always, "off" never.
    probe_spread: str = "auto"
    # How inference brings the cluster probe's verdict to pixels: "scores" (every token's
    # scores, upsampled bilinearly, as the linear probe's logits are) or "features" (the
    # head's features upsampled, then scored: the paper's). docs/quality.md says why.
    probe_upsampling: str = "scores"
    # Keep the backbone's training tokens on disk (float16) and read them back in every later
    # epoch and step: "auto" where they are read more than once and fit (feature_cache.py).
    cache_features: str = "auto"
    checkpoint_seconds: float = 60.0  # a resumable checkpoint at most this often (0: every batch)
    precision: str = "auto"  # mixed precision: see devices.PRECISIONS
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise CauseError(f"Unknown recipe '{self.recipe}'; choose {' or '.join(RECIPES)}.")
        if self.head not in HEADS:
            raise CauseError(f"Unknown head '{self.head}'; this version offers: {', '.join(HEADS)}.")
        if self.pos_embed not in ("reference", "timm"):
            raise CauseError(f"Unknown position-embedding rule '{self.pos_embed}'; choose reference or timm.")
        if self.batch_size < 1:
            raise CauseError("--batch-size must be at least 1.")
        if self.resolution is not None and self.resolution < 1:
            raise CauseError(f"--resolution must be a positive number of pixels, not {self.resolution}.")
        if not 0.0 <= self.dropout < 1.0:
            raise CauseError(f"--dropout is a probability from 0 up to (not including) 1, not {self.dropout}.")
        if self.reduced_dim < 1:
            raise CauseError("--reduced-dim must be at least 1.")
        if self.clusterbook_size < 2:
            raise CauseError("The clusterbook needs at least 2 codes.")
        if self.num_classes is not None and self.num_classes < 2:
            raise CauseError("--num-classes must be at least 2.")
        positive, negative = self.positive_threshold, self.negative_threshold
        if positive is not None and negative is not None and negative > positive:
            raise CauseError("The negative threshold must not exceed the positive threshold.")
        if self.probe_init not in PROBE_INITS:
            raise CauseError(f"Unknown cluster-probe start '{self.probe_init}'; choose {' or '.join(PROBE_INITS)}.")
        if self.probe_space not in PROBE_SPACES:
            raise CauseError(f"Unknown cluster-probe space '{self.probe_space}'; choose {' or '.join(PROBE_SPACES)}.")
        start = "random" if self.recipe == "reference" else self.probe_init  # the recipe sets it later
        if self.probe_consensus is None:
            chose_restarts = self.probe_restarts is not None
            self.probe_consensus = DEFAULT_PROBE_CONSENSUS if start == "kmeans" and not chose_restarts else 0
        if self.probe_restarts is None:
            self.probe_restarts = DEFAULT_PROBE_RESTARTS[start]
        if self.probe_restarts < 1:
            raise CauseError("--probe-restarts must be at least 1.")
        if self.probe_consensus < 0:
            raise CauseError(f"--probe-consensus must be at least 0, not {self.probe_consensus}.")
        if self.probe_consensus and self.probe_init != "kmeans":
            raise CauseError("--probe-consensus needs the k-means start (--probe-init kmeans).")
        if self.probe_spread not in PROBE_SPREADS:
            raise CauseError(f"Unknown cluster-probe spread '{self.probe_spread}'; choose {', '.join(PROBE_SPREADS)}.")
        if self.probe_spread == "on" and (self.refines_probe or self.recipe == "reference"):
            raise CauseError("--probe-spread on needs the k-means start without modularity refinement.")
        if self.probe_upsampling not in PROBE_UPSAMPLINGS:
            raise CauseError(
                f"Unknown cluster-probe upsampling '{self.probe_upsampling}'; choose {' or '.join(PROBE_UPSAMPLINGS)}."
            )
        if self.cache_features not in FEATURE_CACHE_CHOICES:
            raise CauseError(
                f"Unknown feature-cache choice '{self.cache_features}'; choose {', '.join(FEATURE_CACHE_CHOICES)}."
            )
        for name in ("epochs_clusterbook", "epochs_front_door", "epochs_cluster_probe", "min_updates"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CauseError(f"--{name.replace('_', '-')} must not be negative.")

    @property
    def refines_probe(self) -> bool:
        """Whether step three trains the centroids by modularity (a random start always is)."""
        return self.probe_init == "random" or self.probe_refine

    def paper_epochs(self, step: str) -> int:
        return CLUSTER_PROBE_EPOCHS[self.head] if step == "cluster_probe" else PAPER_EPOCHS[step]

    def resolve_thresholds(self, paper_dataset: bool) -> None:
        """Fill in the concept thresholds not given, then check them."""
        positive, negative = PAPER_THRESHOLDS if paper_dataset or self.recipe == "reference" else FOLDER_THRESHOLDS
        if self.positive_threshold is None:
            given_negative = self.negative_threshold
            self.positive_threshold = positive if given_negative is None else max(positive, given_negative)
        if self.negative_threshold is None:
            self.negative_threshold = min(negative, self.positive_threshold)
        if not self.negative_threshold <= self.positive_threshold:
            raise CauseError("The negative threshold must not exceed the positive threshold.")

    def resolve_schedule(self, batches_per_epoch: int, paper_dataset: bool) -> dict[str, dict[str, Any]]:
        """Fill in the epochs not given: the paper's, raised (off the paper's datasets) to at
        least ``min_updates`` updates of ``batches_per_epoch`` (the share of an epoch a step
        trains on). Returns each step's epochs, updates and where they came from."""
        schedule: dict[str, dict[str, Any]] = {}
        for step in SCHEDULED_STEPS:
            name = f"epochs_{step}"
            given = getattr(self, name)
            if given is not None:
                epochs, source = given, "given"
            elif step == "cluster_probe" and not self.refines_probe:
                # The k-means centroids are the probe; the linear probe has learnt in step two.
                epochs, source = 0, "a k-means start, not refined"
            elif paper_dataset or step not in RAISED_STEPS:
                epochs, source = self.paper_epochs(step), "the paper's"
            else:
                needed = -(-self.min_updates // max(1, batches_per_epoch))
                epochs = max(self.paper_epochs(step), needed)
                source = f"at least {self.min_updates} updates" if epochs > self.paper_epochs(step) else "the paper's"
            setattr(self, name, epochs)
            schedule[step] = {"epochs": epochs, "updates": epochs * batches_per_epoch, "from": source}
        return schedule

    def passes_over_images(self) -> dict[int, float]:
        """How many times the resolved schedule reads each training image's tokens, by input
        resolution: every epoch of the three steps (the share of it they train on) and the
        pass that samples the teacher's features for step three's start or whitening."""
        assert self.resolution is not None, "the resolution is resolved when the run is prepared"
        later = self.front_door_resolution or self.resolution
        passes = {self.resolution: 0.0, later: 0.0}
        passes[self.resolution] += (self.epochs_clusterbook or 0) * self.epoch_fraction
        passes[later] += ((self.epochs_front_door or 0) + (self.epochs_cluster_probe or 0)) * self.epoch_fraction
        if self.probe_init == "kmeans" or self.probe_space == "whitened":
            passes[later] += 1
        return passes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: TrainConfig) -> list[tuple[str, Any, Any]]:
        """``(option, this value, other value)`` for every setting that changes what a run
        learns and differs between the two (resolved) configurations."""
        mine, theirs = self.to_dict(), other.to_dict()
        for config in (mine, theirs):
            config["data_dir"] = str(Path(config["data_dir"]).expanduser().resolve())
        return [
            (name, mine[name], theirs[name])
            for name in mine
            if name not in SETTINGS_THAT_CHANGE_NOTHING_LEARNT and mine[name] != theirs[name]
        ]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        # Runs from before the choice existed were evaluated the paper's way.
        data = {"probe_upsampling": "features", **data}
        if isinstance(data.get("cache_features"), bool):  # runs from before "auto": on or off
            data["cache_features"] = "on" if data["cache_features"] else "off"
        return cls(**{key: value for key, value in data.items() if key in known})


# Gradient-clipping norms of the reference's scripts, by (head, dataset), for steps two and
# three. Its scripts stop with NotImplementedError for the other datasets in step two and do
# not clip there in step three; this toolkit uses the COCO-Stuff-27 values for them.
_REFERENCE_CLIP = {("mlp", "cityscapes"): 1.0, ("tr", "cityscapes"): 1.0, ("mlp", "cocostuff27"): 0.1}
_REFERENCE_CLIP_OTHERWISE = {"mlp": 0.1, "tr": 2.0}
# The CAUSE-MLP scripts train steps two and three at 224; CAUSE-TR, step one and evaluation at
# the backbone's resolution.
REFERENCE_MLP_TRAIN_RESOLUTION = 224


def apply_reference_recipe(config: TrainConfig) -> None:
    """Set what the reference recipe fixes (METHOD.md section 7).

    Its four processes never average gradients: each trains its own copy on a quarter of every
    epoch at lr 1e-3 x 4, and process 0's copy is kept. One process reproduces that with lr
    1e-3 x ``reference_gpus`` and ``1 / reference_gpus`` of each epoch's batches.
    """
    if config.recipe != "reference":
        return
    gpus = max(1, config.reference_gpus)
    config.learning_rate = 1e-3 * gpus
    config.epoch_fraction = 1.0 / gpus
    config.weight_decay = 0.0 if config.dataset == "cityscapes" else 1e-4
    config.grad_clip = _REFERENCE_CLIP.get((config.head, config.dataset), _REFERENCE_CLIP_OTHERWISE[config.head])
    if config.head == "mlp":
        config.front_door_resolution = REFERENCE_MLP_TRAIN_RESOLUTION
    config.epochs_clusterbook, config.epochs_front_door = 1, 2
    config.epochs_cluster_probe = CLUSTER_PROBE_EPOCHS[config.head]
    config.probe_init, config.probe_refine, config.probe_space = "random", True, "head"
    config.probe_spread, config.probe_upsampling = "off", "features"
