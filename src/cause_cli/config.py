"""The settings of a training run, each declared once: its name, type, default, choices, range,
help and panel live on its field of :class:`TrainConfig`. The ``cause train`` options, their
checks, the checks of a run's ``run.json`` and of a ``--config`` file, and docs/train.md's
table are all made from these fields. Defaults are METHOD.md section 5."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rules import either, flag, integer, mapping, name, number, text
from .settings import Setting, choice_rule, setting, settings_of

HEADS = ("mlp", "tr")
PROBE_INITS = ("kmeans", "random")
PROBE_SPACES = ("whitened", "head")
PROBE_SPREADS = ("auto", "on", "off")
PROBE_UPSAMPLINGS = ("scores", "features")
FEATURE_CACHE_CHOICES = ("auto", "on", "off")
POSITION_EMBEDDING_RULES = ("reference", "timm")
RECIPES = ("default", "reference")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DATASET_NAMES = ("cocostuff27", "cocostuff81", "cocostuff171", "cityscapes", "voc2012", "folder")
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

# The largest input side a run may ask for. Every image is resized to R x R for the backbone
# (3 R^2 floats) and its (R / patch)^2 tokens pass through every attention layer: at 4096 px
# that is 200 MiB of input and 262,144 tokens for a patch of 8, far past anything trained (the
# paper's 320 px) yet within memory, as attention runs fused, in memory linear in the tokens
# (segmenting with the toy backbone on a CPU peaked at 1.1 GB at 1,024 px, 1.4 GB at 2,048 px).
# A larger number is a damaged file, not a setting: 100,000 px would be a 30 GB resized image
# and a 120 GB input tensor before the backbone even starts.
MAX_RESOLUTION = 4096
# Label maps hold up to 65,536 ids (16-bit greyscale past 256: inference/segment.py).
MAX_CLASSES = 65_536
# Widths of the head's features and projections: far above any trained (90 and 2048).
MAX_REDUCED_DIM = 4096
MAX_PROJECTION_DIM = 16_384
MAX_CLUSTERBOOK_SIZE = 65_536
MAX_PATCH_SIZE = 1024
MAX_COUNT = 1_000_000_000  # epochs, updates and other counts: anything larger is not a setting

# The panels of ``cause train --help``, in the order they are shown.
DATA, MODEL, STEP_1, STEP_2, STEP_3, SCHEDULE, SPEED = (
    "Data",
    "Backbone and head",
    "Step 1: clusterbook",
    "Step 2: front door",
    "Step 3: cluster probe",
    "Schedule and optimiser",
    "Speed",
)


def absolute_data_dir(data_dir: str) -> str:
    """The data folder as a run stores it, so that it can be evaluated or continued from anywhere."""
    return str(Path(data_dir).expanduser().resolve())


def _choices(constant: str) -> Callable[[], tuple[str, ...]]:
    """The accepted values of a setting, read from this module when checked (so a registered
    variant can add to them)."""
    return lambda: tuple(globals()[constant])


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run computes, saved in the run's ``run.json``. Frozen:
    :func:`cause_cli.resolve.resolve_config` makes the complete one a run trains with."""

    data_dir: str = setting(
        None, "The dataset folder (needed unless --resume).", DATA, text, shown_default="", metavar="<path>"
    )
    dataset: str = setting(
        "folder",
        "Layout of the data folder (docs/train.md: Datasets).",
        DATA,
        name,
        choices=_choices("DATASET_NAMES"),  # checked where datasets open, which also knows the reference's names
    )
    num_classes: int | None = setting(
        None,
        "Clusters to find.",
        DATA,
        integer(1, MAX_CLASSES),
        shown_default="from the labels or classes.txt",
    )
    val_fraction: float = setting(
        0.2, "Share of a folder's images held out for validation.", DATA, number(0.0, 1.0)
    )
    backbone: str = setting("toy", "Backbone name (cause fetch --list).", MODEL, name)
    pos_embed: str = setting(
        "reference",
        "How position embeddings are resized to the input's grid: reference (the reference code's rule "
        "for the backbone, so heads match reference-trained ones) or timm.",
        MODEL,
        choices=_choices("POSITION_EMBEDDING_RULES"),
        noun="position-embedding rule",
    )
    resolution: int | None = setting(
        None,
        "Input size in pixels, a multiple of the patch size.",
        MODEL,
        integer(1, MAX_RESOLUTION),
        shown_default="the backbone's",
    )
    head: str = setting(
        "mlp",
        "Segmentation head: mlp (CAUSE-MLP), or tr (CAUSE-TR, the paper's best).",
        MODEL,
        choices=_choices("HEADS"),
        noun="head",
    )
    reduced_dim: int = setting(
        90, "Width of the head's features (what the cluster probe clusters).", MODEL, integer(1, MAX_REDUCED_DIM)
    )
    projection_dim: int = setting(
        2048, "Width of the projections the contrastive loss compares.", MODEL, integer(1, MAX_PROJECTION_DIM)
    )
    dropout: float = setting(
        0.1, "Dropout of the heads.", MODEL, number(0.0, 1.0, high_open=True)
    )
    clusterbook_size: int = setting(
        2048, "Concepts K in the clusterbook.", STEP_1, integer(2, MAX_CLUSTERBOOK_SIZE)
    )
    epochs_clusterbook: int | None = setting(
        None, "Epochs of step 1.", STEP_1, integer(0, MAX_COUNT), shown_default="the paper's 1"
    )
    epochs_front_door: int | None = setting(
        None,
        "Epochs of step 2.",
        STEP_2,
        integer(0, MAX_COUNT),
        shown_default="the paper's 2, or enough for --min-updates",
    )
    positive_threshold: float | None = setting(
        None,
        "Concept similarity above which two tokens are positives.",
        STEP_2,
        number(-1.0, 1.0),
        shown_default="the paper's 0.3 on its datasets, 0.5 on a folder",
    )
    negative_threshold: float | None = setting(
        None,
        "Concept similarity below which two tokens are negatives.",
        STEP_2,
        number(-1.0, 1.0),
        shown_default="the paper's 0.1 on its datasets, 0.3 on a folder",
    )
    contrastive_temperature: float = setting(
        0.07, "Temperature of the contrastive loss.", STEP_2, number(0.0, math.inf, low_open=True)
    )
    use_bank: bool = setting(True, "Draw negatives from a bank of earlier batches' tokens too.", STEP_2, flag)
    bank_capacity: int = setting(100, "Batches the bank of negatives keeps.", STEP_2, integer(0, MAX_COUNT))
    grid_sampling: bool = setting(True, "Sample the tokens of a grid, not all of them.", STEP_2, flag)
    grid_window: int = setting(4, "Side of the sampling grid's window.", STEP_2, integer(1, MAX_RESOLUTION))
    ema_momentum: float = setting(
        0.99, "Momentum of the teacher head, an average of the student.", STEP_2, number(0.0, 1.0)
    )
    front_door_resolution: int | None = setting(
        None,
        "Input size of steps 2 and 3.",
        STEP_2,
        integer(1, MAX_RESOLUTION),
        shown_default="the run's --resolution",
    )
    epochs_cluster_probe: int | None = setting(
        None,
        "Epochs of step 3.",
        STEP_3,
        integer(0, MAX_COUNT),
        shown_default="the paper's 1 for mlp and 5 for tr, or enough for --min-updates",
    )
    probe_init: str = setting(
        "kmeans",
        "How the cluster probe starts: kmeans (spherical k-means on the head's features, no labels) or "
        "random (the paper's, refined by modularity).",
        STEP_3,
        choices=_choices("PROBE_INITS"),
        noun="cluster-probe start",
    )
    probe_refine: bool = setting(
        False,
        "Refine the k-means centroids by the paper's modularity objective (a random start always is).",
        STEP_3,
        flag,
    )
    probe_space: str = setting(
        "whitened",
        "Where the cluster probe clusters: whitened (the head's features whitened by a fit on the "
        "training images, no labels) or head (the head's features, the paper's).",
        STEP_3,
        choices=_choices("PROBE_SPACES"),
        noun="cluster-probe space",
    )
    probe_restarts: int | None = setting(
        None,
        "Starts of the cluster probe: k-means restarts (best mean cosine kept; given alone, it turns the "
        "consensus off) or random starts (best modularity kept).",
        STEP_3,
        integer(1, 1_000_000),
        shown_default="8 for kmeans, 1 for random",
    )
    probe_consensus: int | None = setting(
        None,
        "k-means start only: the consensus of this many single-start fits (points go together when most "
        "fits put them together) instead of the restart of best mean cosine; 0 keeps the best restart.",
        STEP_3,
        integer(0, 1_000_000),
        shown_default="16, or 0 with --probe-restarts",
    )
    probe_spread: str = setting(
        "auto",
        "k-means start only: give the clusters a spread (equal Gaussians sharing one diagonal covariance) "
        "where the consensus' fits agree on under 85% of the points (auto), always (on) or never (off).",
        STEP_3,
        choices=_choices("PROBE_SPREADS"),
        noun="cluster-probe spread",
    )
    probe_upsampling: str = setting(
        "scores",
        "How label maps reach pixel size: score every token and upsample the scores (scores), or upsample "
        "the head's features and score every pixel (features, the paper's).",
        STEP_3,
        choices=_choices("PROBE_UPSAMPLINGS"),
        noun="cluster-probe upsampling",
    )
    modularity_temperature: float = setting(
        0.1, "Temperature of the modularity objective.", STEP_3, number(0.0, math.inf, low_open=True)
    )
    batch_size: int = setting(16, "Images per update (per process).", SCHEDULE, integer(1, MAX_CLUSTERBOOK_SIZE))
    learning_rate: float = setting(1e-3, "Learning rate of every step.", SCHEDULE, number(0.0, math.inf))
    weight_decay: float = setting(1e-4, "Weight decay of every step.", SCHEDULE, number(0.0, math.inf))
    grad_clip: float = setting(2.0, "Gradient-norm clipping of steps 2 and 3.", SCHEDULE, number(0.0, math.inf))
    min_updates: int = setting(
        DEFAULT_MIN_UPDATES,
        "Optimiser updates steps 2 and 3 make at least on your own folder (the paper's datasets keep the "
        "paper's epochs): epochs not given are raised to reach it.",
        SCHEDULE,
        integer(0, MAX_COUNT),
    )
    epoch_fraction: float = setting(
        1.0, "Share of each epoch's batches a step trains on.", SCHEDULE, number(0.0, 1.0, low_open=True)
    )
    seed: int = setting(0, "Random seed.", SCHEDULE, integer(-(2**63), 2**64 - 1))  # what torch.manual_seed takes
    recipe: str = setting(
        "default",
        "default: labels train nothing but the linear probe. reference: the reference code's recipe exactly "
        "(lr x 4 on a quarter of each epoch, its clipping, MLP steps 2-3 at 224) including its label leak: "
        "the linear probe's cross-entropy trains the teacher head in step 3.",
        SCHEDULE,
        choices=_choices("RECIPES"),
        noun="recipe",
    )
    reference_gpus: int = setting(
        4, "The reference's process count, which its recipe depends on.", SCHEDULE, integer(1, 4096)
    )
    workers: int | None = setting(
        None,
        "Processes loading images (0: in this process).",
        SPEED,
        integer(0, 4096),
        flag="--loader-workers",
        shown_default="none on the CPU, up to 8 per GPU",
    )
    cache_features: str = setting(
        "auto",
        "Compute the frozen backbone's tokens once (float16 on disk) for all epochs and steps: auto (when "
        "they are read more than once and fit on the disk; on a GPU, in memory), on or off.",
        SPEED,
        either(choice_rule(_choices("FEATURE_CACHE_CHOICES")), flag),  # a flag in runs from before "auto"
        choices=_choices("FEATURE_CACHE_CHOICES"),
        noun="feature-cache choice",
    )
    checkpoint_seconds: float = setting(
        60.0,
        "Seconds between resumable checkpoints (0: every batch).",
        SPEED,
        number(0.0, math.inf),
        flag="--checkpoint-every",
    )
    precision: str = setting(
        "auto",
        "auto (float32 on the CPU, bfloat16 on GPUs that have it, else float16), float32, bfloat16 or float16.",
        SPEED,
        choices=_choices("PRECISIONS"),
        noun="precision",
    )
    extra: dict[str, Any] = setting(  # noqa: RUF009  (a field, made by setting())
        {}, "Anything else a caller records.", SPEED, mapping, on_command_line=False
    )

    @classmethod
    def settings(cls) -> list[Setting]:
        """Every setting as the CLI, the checks and the docs see it, in declaration order."""
        return settings_of(cls)

    @property
    def refines_probe(self) -> bool:
        """Whether step three trains the centroids by modularity (a random start always is)."""
        return self.probe_init == "random" or self.probe_refine

    def paper_epochs(self, step: str) -> int:
        return CLUSTER_PROBE_EPOCHS[self.head] if step == "cluster_probe" else PAPER_EPOCHS[step]

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

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: TrainConfig) -> list[tuple[str, Any, Any]]:
        """``(option, this value, other value)`` for every setting that changes what a run
        learns and differs between the two (resolved) configurations."""
        mine, theirs = self.to_dict(), other.to_dict()
        for config in (mine, theirs):
            config["data_dir"] = absolute_data_dir(config["data_dir"])
        return [
            (name, mine[name], theirs[name])
            for name in mine
            if name not in SETTINGS_THAT_CHANGE_NOTHING_LEARNT and mine[name] != theirs[name]
        ]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A run's saved configuration, as runs of every version of this toolkit wrote it."""
        known = {f.name for f in dataclasses.fields(cls)}
        # Runs from before the choice existed were evaluated the paper's way.
        data = {"probe_upsampling": "features", **data}
        if isinstance(data.get("cache_features"), bool):  # runs from before "auto": on or off
            data["cache_features"] = "on" if data["cache_features"] else "off"
        return cls(**{key: value for key, value in data.items() if key in known})
