"""A training run: the configuration checked against the data, then the three steps of
CAUSE (METHOD.md sections 1 to 3) in order, each skipped when its file is already in the run.

1. the concept clusterbook (:mod:`.clusterbook`);
2. the segmentation head by the front-door adjustment (:mod:`.front_door`);
3. the cluster probe (:mod:`.cluster_probe`).

Labels train nothing but the linear probe, and only on detached features.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import torch

from .._version import __version__
from ..backbones import load_backbone, refuse_other_backbone
from ..config import TrainConfig, absolute_data_dir
from ..data import canonical_name, open_dataset
from ..data.loading import LoadReport, ShuffledBatches
from ..devices import resolve_device, use_precision
from ..distributed import REFERENCE_RECIPE_ALONE, SINGLE_PROCESS, ProcessGroup, from_environment
from ..distributed import start as join_processes
from ..distributed import stop as leave_processes
from ..errors import CauseError, Interrupted
from ..interrupts import raise_if_interrupted
from ..paths import refuse_unusable_folder
from ..progress import Reporter
from ..resolve import TrainingFacts, input_resolution, resolve_config, validated
from ..runs import CLUSTERBOOK_FILE, HEAD_FILE, LOG_FILE, PROBE_FILE, RESUME_FILE, RunDirectory
from .cluster_probe import train_cluster_probe
from .clusterbook import train_clusterbook
from .context import TrainingContext, seed_everything
from .feature_cache import decide_feature_caches, describe_feature_caches
from .front_door import train_front_door
from .history import write_curves
from .probe_kinds import check_probe_variants


def prepare(
    config: TrainConfig,
    run: RunDirectory,
    device_name: str,
    reporter: Reporter,
    group: ProcessGroup = SINGLE_PROCESS,
    overwrite: bool = False,
) -> TrainingContext:
    """Check the configuration against the data and the run folder; load the backbone; resolve
    the configuration the run trains with (:func:`cause_cli.resolve.resolve_config`, the one
    place it is completed). With ``overwrite``, the earlier training's files are removed once
    everything has been checked."""
    if group.distributed and config.recipe == "reference":
        raise CauseError(REFERENCE_RECIPE_ALONE)
    if group.distributed and config.cache_features == "on" and not group.single_node:
        raise CauseError("--cache-features works with the processes of one machine only, not across machines.")
    device = join_processes(group, resolve_device(device_name))
    if run.has("run.json") and not overwrite:  # a run made with another backbone is refused before anything loads
        refuse_other_backbone(run.path, run.read_run_info(), config.backbone)
    backbone = load_backbone(config.backbone, device, pos_embed=config.pos_embed)
    resolution = input_resolution(config, backbone.spec.resolution, backbone.patch_size)
    dataset, data_dir = canonical_name(config.dataset), absolute_data_dir(config.data_dir)
    train_set = open_dataset(dataset, data_dir, "train", resolution, config.val_fraction, crops=True)
    if train_set.note:
        reporter.message(train_set.note)
        run.log(train_set.note)
    found = f"data: {len(train_set):,} training images" + (f" ({train_set.split_rule})" if train_set.split_rule else "")
    reporter.message(found)
    run.log(found)
    for path, reason in train_set.unreachable:
        reporter.message(f"skipped {path}: {reason}")
        run.log(f"skipped {path}: {reason}")
    if train_set.unreachable:
        reporter.quiet_summary(
            f"skipped {len(train_set.unreachable)} folder(s) or link(s) that could not be read, listed in "
            f"{run.file(LOG_FILE)}"
        )
    facts = TrainingFacts(
        dataset=dataset,
        data_dir=data_dir,
        backbone_resolution=backbone.spec.resolution,
        patch_size=backbone.patch_size,
        classes_in_data=None if config.num_classes else train_set.infer_num_classes(),
        whole_epoch_batches=len(ShuffledBatches(len(train_set), config.batch_size, config.seed, 0, group.world_size)),
    )
    resolved = resolve_config(config, facts)
    config, schedule = resolved.config, resolved.schedule
    check_probe_variants(config)  # step three's start and space can serve, before anything is written
    num_classes = config.num_classes
    assert num_classes is not None and config.resolution is not None
    if config.recipe == "reference" and not train_set.has_labels:
        raise CauseError("--recipe reference trains with labels (the reference's linear probe); this data has none.")
    if len(train_set) < group.world_size:
        raise CauseError(f"{len(train_set)} training images cannot be shared among {group.world_size} processes.")
    refuse_more_clusters_than_tokens(num_classes, len(train_set), config.resolution // backbone.patch_size)
    if run.has("run.json") and not overwrite:
        refuse_other_backbone(run.path, run.read_run_info(), backbone)
    message = "schedule: " + ", ".join(
        f"{step.replace('_', ' ')} {plan['epochs']} epochs ({plan['updates']} updates)"
        for step, plan in schedule.items()
    )
    message += f"; concept thresholds {config.positive_threshold} / {config.negative_threshold}"
    caches = decide_feature_caches(
        config.cache_features,
        config.passes_over_images(),
        len(train_set),
        backbone.patch_size,
        backbone.dim,
        run.path,
        device.type,
        across_machines=group.distributed and not group.single_node,
    )
    message += "; " + describe_feature_caches(caches)
    if overwrite and run.writes:  # everything is checked: the earlier training can go
        for problem in run.clear_training():
            reporter.message(f"left in place: {problem}")
    reporter.message(message)
    run.log(message)
    if run.has("run.json"):
        refuse_other_settings(run, config)
    run.write_run_info(
        {
            "toolkit_version": __version__,
            "config": config.to_dict(),
            "schedule": schedule,
            "backbone": backbone.describe(),
            "num_classes": num_classes,
            "class_names": train_set.class_names,
        }
    )
    generator = torch.Generator().manual_seed(config.seed)
    context = TrainingContext(config, run, device, backbone, train_set, num_classes, reporter, generator, group=group)
    context.cached_resolutions = {resolution for resolution, (on, _) in caches.items() if on}
    return context


# Step three scores every pixel against every cluster and matches clusters to classes with a
# C x C cost: far past this, memory runs out long before a result.
MOST_CLUSTERS = 4096


def refuse_more_clusters_than_tokens(num_classes: int, images: int, grid: int) -> None:
    """One sentence, before anything is allocated, for more clusters than there are tokens to
    put in them (or than any label map can usefully hold)."""
    tokens = images * grid * grid
    if num_classes > min(tokens, MOST_CLUSTERS):
        limit = (
            f"the {tokens:,} patch tokens of {images:,} training image(s)"
            if tokens < MOST_CLUSTERS
            else f"the {MOST_CLUSTERS:,} clusters cause trains at most"
        )
        raise CauseError(f"--num-classes {num_classes:,} is more than {limit}; give fewer.")


def refuse_other_settings(run: RunDirectory, config: TrainConfig) -> None:
    """A run folder holds one training: continuing it with other settings would leave files
    (and a run.json) that describe a training that never happened."""
    differences = run.config().differences(config)
    if not differences:
        return
    listed = "; ".join(f"--{name.replace('_', '-')} {old} there, {new} here" for name, old, new in differences)
    raise CauseError(
        f"{run.path} was trained with other settings ({listed}): give a new --run folder, or add "
        "--overwrite to train this one over."
    )


def train(
    config: TrainConfig,
    run_path: Path | str,
    device: str = "auto",
    reporter: Reporter | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunDirectory:
    """Run the three steps into ``run_path``, skipping the steps already done there; with
    ``resume``, an interrupted step continues from its last checkpoint; with ``overwrite``, the
    files an earlier training and evaluation wrote there are removed once every option and
    input has been checked (files the toolkit did not write are never removed).

    Started by torchrun, the process trains together with the others (see
    :mod:`cause_cli.distributed`); rank 0 reports and writes.
    """
    config = validated(config)  # before anything is written
    if resume and overwrite:
        raise CauseError("--resume continues a run and --overwrite starts it over: give one of them.")
    group = from_environment()
    reporter = (reporter or Reporter()) if group.is_main else Reporter()
    run = RunDirectory(Path(run_path), writes=group.is_main)
    refuse_unusable_folder(run.path, "--run")
    if run.writes:
        run.refuse_foreign_files(overwrite)
    made_here = run.writes and not run.path.exists()
    try:
        with run.writing("train"), use_precision(config.precision):
            try:
                return _train_steps(config, run, device, reporter, resume, group, overwrite)
            except KeyboardInterrupt:
                advice = f"continue with: {resume_command(run.path)}"
                if run.path.is_dir():
                    run.log(f"interrupted; {advice}")
                raise Interrupted(advice) from None
    except CauseError:
        if made_here:  # refused before any result: the folder it made for the run goes too
            run.remove_if_bookkeeping_only()
        raise
    finally:
        leave_processes(group)


def resume_command(run_path: Path) -> str:
    """The command line that continues an interrupted training of ``run_path``."""
    return f"cause train --run {shlex.quote(str(run_path))} --resume"


def _train_steps(
    config: TrainConfig,
    run: RunDirectory,
    device: str,
    reporter: Reporter,
    resume: bool,
    group: ProcessGroup,
    overwrite: bool,
) -> RunDirectory:
    context = prepare(config, run, device, reporter, group, overwrite)
    group.barrier()
    context.resume = resume
    if run.has(RESUME_FILE) and not resume:
        reporter.message(f"{run.path} holds an interrupted step; starting it over (--resume continues it)")
    steps = (
        (CLUSTERBOOK_FILE, "step 1/3 clusterbook", train_clusterbook),
        (HEAD_FILE, "step 2/3 front door", train_front_door),
        (PROBE_FILE, "step 3/3 cluster probe", train_cluster_probe),
    )
    for index, (file_name, title, step) in enumerate(steps):
        if run.has(file_name):
            reporter.message(f"{title}: {file_name} already in {run.path}, skipped")
            run.log(f"{title}: skipped, {file_name} exists")
            continue
        # Each step draws from its own seed, so it computes the same whether or not the
        # steps before it ran in this process.
        seed_everything(config.seed * 1000 + index)
        context.generator.manual_seed(config.seed * 1000 + index)
        raise_if_interrupted()
        started = time.perf_counter()
        step(context, title)
        run.remove_file(RESUME_FILE)
        group.barrier()  # the step's file is written before any process reads it
        elapsed = time.perf_counter() - started
        run.log(f"{title}: done in {elapsed:.1f}s")
        reporter.message(f"{title}: done in {elapsed:.1f}s")
    if group.is_main and run.writes:
        write_curves(run)
    for report in group.gather_objects(context.load_report)[1:]:  # what the other processes met
        assert isinstance(report, LoadReport)
        context.load_report.merge(report)
    for line in context.load_report.lines(config.dataset, context.num_classes):
        reporter.message(line)
        run.log(line)
    if context.load_report.skipped:
        skipped = len(context.load_report.skipped)
        reporter.quiet_summary(f"skipped {skipped} unreadable file(s), listed in {run.file(LOG_FILE)}")
    ignored = context.load_report.ignored_above()
    if ignored is not None:
        reporter.quiet_summary(
            f"ignored {ignored['pixels']:,} labelled pixel(s) with class ids at or above {context.num_classes}, "
            f"listed in {run.file(LOG_FILE)}"
        )
    return run
