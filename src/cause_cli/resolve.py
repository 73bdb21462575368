"""From the settings given to the configuration a run trains with, in one place.

:func:`resolve_config` is pure: it takes the settings as given (on the command line, in a
``--config`` file, or a run's own ``run.json``) and what the data and the backbone are, and
returns the complete, frozen configuration and the schedule. Defaults that depend on the data
(the class count, the concept thresholds, the epochs) and the reference recipe are applied
here and nowhere else; nothing changes the configuration afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import (
    CLUSTER_PROBE_EPOCHS,
    DEFAULT_PROBE_CONSENSUS,
    DEFAULT_PROBE_RESTARTS,
    FOLDER_THRESHOLDS,
    PAPER_THRESHOLDS,
    RAISED_STEPS,
    SCHEDULED_STEPS,
    TrainConfig,
)
from .errors import CauseError
from .rules import shown

# Gradient-clipping norms of the reference's scripts, by (head, dataset), for steps two and
# three. Its scripts stop with NotImplementedError for the other datasets in step two and do
# not clip there in step three; this toolkit uses the COCO-Stuff-27 values for them.
_REFERENCE_CLIP = {("mlp", "cityscapes"): 1.0, ("tr", "cityscapes"): 1.0, ("mlp", "cocostuff27"): 0.1}
_REFERENCE_CLIP_OTHERWISE = {"mlp": 0.1, "tr": 2.0}
# The CAUSE-MLP scripts train steps two and three at 224; CAUSE-TR, step one and evaluation at
# the backbone's resolution.
REFERENCE_MLP_TRAIN_RESOLUTION = 224
Schedule = dict[str, dict[str, Any]]


def validated(config: TrainConfig) -> TrainConfig:
    """``config`` checked setting by setting and against itself, with the cluster probe's
    starts filled in (they depend on other settings only). One sentence for the first problem."""
    if config.data_dir is None:
        raise CauseError("Say where the images are with --data-dir.")
    settings = TrainConfig.settings()
    for setting in settings:
        problem = setting.unknown_choice(getattr(config, setting.name))
        if problem:
            raise CauseError(problem)
    if config.batch_size < 1:
        raise CauseError("--batch-size must be at least 1.")
    if config.resolution is not None and config.resolution < 1:
        raise CauseError(f"--resolution must be a positive number of pixels, not {config.resolution}.")
    if not 0.0 <= config.dropout < 1.0:
        raise CauseError(f"--dropout is a probability from 0 up to (not including) 1, not {config.dropout}.")
    if config.reduced_dim < 1:
        raise CauseError("--reduced-dim must be at least 1.")
    if config.clusterbook_size < 2:
        raise CauseError("The clusterbook needs at least 2 codes.")
    if config.num_classes is not None and config.num_classes < 2:
        raise CauseError("--num-classes must be at least 2.")
    if config.workers is not None and config.workers < 0:
        raise CauseError(f"--loader-workers must be at least 0, not {config.workers}.")
    positive, negative = config.positive_threshold, config.negative_threshold
    if positive is not None and negative is not None and negative > positive:
        raise CauseError("The negative threshold must not exceed the positive threshold.")
    start = "random" if config.recipe == "reference" else config.probe_init  # the recipe sets it later
    consensus, restarts = config.probe_consensus, config.probe_restarts
    if consensus is None:
        consensus = DEFAULT_PROBE_CONSENSUS if start == "kmeans" and restarts is None else 0
    if restarts is None:
        restarts = DEFAULT_PROBE_RESTARTS.get(start, 1)
    if restarts < 1:
        raise CauseError("--probe-restarts must be at least 1.")
    if consensus < 0:
        raise CauseError(f"--probe-consensus must be at least 0, not {consensus}.")
    if consensus and config.probe_init != "kmeans":
        raise CauseError("--probe-consensus needs the k-means start (--probe-init kmeans).")
    if config.probe_spread == "on" and (config.refines_probe or config.recipe == "reference"):
        raise CauseError("--probe-spread on needs the k-means start without modularity refinement.")
    for name in ("epochs_clusterbook", "epochs_front_door", "epochs_cluster_probe", "min_updates"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise CauseError(f"--{name.replace('_', '-')} must not be negative.")
    for setting in settings:  # what no sentence above names: the declared range
        if setting.name == "num_classes":
            continue  # held against the training tokens once the data is open, a sharper sentence
        value = getattr(config, setting.name)
        problem = None if value is None and setting.may_be_none else setting.rule(value)
        if problem:
            raise CauseError(f"{setting.flag} is {shown(value)}, not {problem}.")
    return config.replace(probe_consensus=consensus, probe_restarts=restarts)


def apply_reference_recipe(config: TrainConfig) -> TrainConfig:
    """``config`` with what the reference recipe fixes (METHOD.md section 7); unchanged under
    the default recipe.

    Its four processes never average gradients: each trains its own copy on a quarter of every
    epoch at lr 1e-3 x 4, and process 0's copy is kept. One process reproduces that with lr
    1e-3 x ``reference_gpus`` and ``1 / reference_gpus`` of each epoch's batches.
    """
    if config.recipe != "reference":
        return config
    gpus = max(1, config.reference_gpus)
    return config.replace(
        learning_rate=1e-3 * gpus,
        epoch_fraction=1.0 / gpus,
        weight_decay=0.0 if config.dataset == "cityscapes" else 1e-4,
        grad_clip=_REFERENCE_CLIP.get((config.head, config.dataset), _REFERENCE_CLIP_OTHERWISE[config.head]),
        front_door_resolution=REFERENCE_MLP_TRAIN_RESOLUTION if config.head == "mlp" else config.front_door_resolution,
        epochs_clusterbook=1,
        epochs_front_door=2,
        epochs_cluster_probe=CLUSTER_PROBE_EPOCHS[config.head],
        probe_init="random",
        probe_refine=True,
        probe_space="head",
        probe_spread="off",
        probe_upsampling="features",
    )


def resolve_thresholds(config: TrainConfig, paper_dataset: bool) -> TrainConfig:
    """``config`` with the concept thresholds not given filled in, checked."""
    positive, negative = PAPER_THRESHOLDS if paper_dataset or config.recipe == "reference" else FOLDER_THRESHOLDS
    chosen_positive = config.positive_threshold
    if chosen_positive is None:
        given_negative = config.negative_threshold
        chosen_positive = positive if given_negative is None else max(positive, given_negative)
    chosen_negative = config.negative_threshold
    if chosen_negative is None:
        chosen_negative = min(negative, chosen_positive)
    if not chosen_negative <= chosen_positive:
        raise CauseError("The negative threshold must not exceed the positive threshold.")
    return config.replace(positive_threshold=chosen_positive, negative_threshold=chosen_negative)


def resolve_schedule(config: TrainConfig, batches_per_epoch: int, paper_dataset: bool) -> tuple[TrainConfig, Schedule]:
    """``config`` with the epochs not given filled in: the paper's, raised (off the paper's
    datasets) to at least ``min_updates`` updates of ``batches_per_epoch`` (the share of an
    epoch a step trains on); and each step's epochs, updates and where they came from."""
    schedule: Schedule = {}
    epochs_of: dict[str, int] = {}
    for step in SCHEDULED_STEPS:
        given = getattr(config, f"epochs_{step}")
        if given is not None:
            epochs, source = given, "given"
        elif step == "cluster_probe" and not config.refines_probe:
            # The k-means centroids are the probe; the linear probe has learnt in step two.
            epochs, source = 0, "a k-means start, not refined"
        elif paper_dataset or step not in RAISED_STEPS:
            epochs, source = config.paper_epochs(step), "the paper's"
        else:
            needed = -(-config.min_updates // max(1, batches_per_epoch))
            epochs = max(config.paper_epochs(step), needed)
            source = f"at least {config.min_updates} updates" if epochs > config.paper_epochs(step) else "the paper's"
        epochs_of[f"epochs_{step}"] = epochs
        schedule[step] = {"epochs": epochs, "updates": epochs * batches_per_epoch, "from": source}
    return config.replace(**epochs_of), schedule


@dataclass(frozen=True)
class TrainingFacts:
    """What the data and the backbone say, which the configuration's defaults depend on."""

    dataset: str  # the canonical name
    data_dir: str  # absolute
    backbone_resolution: int
    patch_size: int
    classes_in_data: int | None  # from the labels or classes.txt; None where they do not say
    whole_epoch_batches: int  # batches of one whole epoch, over all processes


@dataclass(frozen=True)
class ResolvedTraining:
    config: TrainConfig
    schedule: Schedule
    batches_per_epoch: int


def input_resolution(config: TrainConfig, backbone_resolution: int, patch_size: int) -> int:
    """The resolution a run trains at: the one given, else the backbone's; a multiple of the patch."""
    resolution = config.resolution or backbone_resolution
    if resolution % patch_size:
        raise CauseError(f"Resolution {resolution} is not a multiple of the patch size {patch_size}.")
    return resolution


def resolve_config(given: TrainConfig, facts: TrainingFacts) -> ResolvedTraining:
    """The complete configuration a run trains with, from the settings ``given`` and the
    ``facts`` of its data and backbone; the same settings and facts always give the same one."""
    config = validated(given)
    num_classes = config.num_classes or facts.classes_in_data
    if num_classes is None:
        raise CauseError(
            "The data has no labels and no classes.txt, so say how many clusters to find with --num-classes."
        )
    config = config.replace(
        resolution=input_resolution(config, facts.backbone_resolution, facts.patch_size),
        dataset=facts.dataset,
        # Stored resolved, so that the run can be evaluated or continued from any folder.
        data_dir=facts.data_dir,
        num_classes=num_classes,
    )
    config = apply_reference_recipe(config)
    batches_per_epoch = max(1, math.ceil(facts.whole_epoch_batches * config.epoch_fraction))
    paper_dataset = config.dataset != "folder"
    config = resolve_thresholds(config, paper_dataset)
    config, schedule = resolve_schedule(config, batches_per_epoch, paper_dataset)
    return ResolvedTraining(config, schedule, batches_per_epoch)
