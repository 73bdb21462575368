"""cause train and cause prepare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..config import DEFAULT_MIN_UPDATES
from ..errors import CauseError
from ..paths import json_text
from .base import (
    DATASET_HELP,
    CauseCommand,
    DeviceOption,
    JsonOption,
    PrecisionOption,
    QuietOption,
    _relaunch,
    _reporter,
    app,
    require_at_least,
    stderr,
    stdout,
    user_errors,
)


@app.command(cls=CauseCommand)
@user_errors
def train(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="The dataset folder (needed unless --resume).")
    ] = None,
    dataset: Annotated[str, typer.Option("--dataset", help=DATASET_HELP)] = "folder",
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone name (see cause fetch --list).")] = "toy",
    run: Annotated[
        Path | None,
        typer.Option("--run", help="Run folder (default: runs/train, or runs/train2, runs/train3... when taken)."),
    ] = None,
    head: Annotated[
        str, typer.Option("--head", help="Segmentation head: mlp, or tr (CAUSE-TR, the paper's best).")
    ] = "mlp",
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", help="Clusters to find (default: from the labels or classes.txt).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Input size (default: the backbone's).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    clusterbook_size: Annotated[int, typer.Option("--clusterbook-size", help="Concepts K in the clusterbook.")] = 2048,
    reduced_dim: Annotated[
        int, typer.Option("--reduced-dim", help="Width of the head's features (the paper's 90).", min=1)
    ] = 90,
    epochs_clusterbook: Annotated[
        int | None, typer.Option("--epochs-clusterbook", help="Default: the paper's 1, or enough for --min-updates.")
    ] = None,
    epochs_front_door: Annotated[
        int | None, typer.Option("--epochs-front-door", help="Default: the paper's 2, or enough for --min-updates.")
    ] = None,
    epochs_cluster_probe: Annotated[
        int | None,
        typer.Option(
            "--epochs-cluster-probe", help="Default: the paper's 1 for mlp and 5 for tr, or enough for --min-updates."
        ),
    ] = None,
    min_updates: Annotated[
        int,
        typer.Option(
            "--min-updates",
            help="Optimiser updates each step makes at least, on your own folder (the paper's datasets keep the "
            "paper's epochs): epochs not given are raised to reach it.",
        ),
    ] = DEFAULT_MIN_UPDATES,
    positive_threshold: Annotated[
        float | None,
        typer.Option(
            "--positive-threshold",
            help="Concept similarity above which two tokens are positives (default: the paper's 0.3 on its "
            "datasets, 0.5 on your own folder).",
        ),
    ] = None,
    negative_threshold: Annotated[
        float | None,
        typer.Option(
            "--negative-threshold",
            help="Concept similarity below which two tokens are negatives (default: the paper's 0.1 on its "
            "datasets, 0.3 on your own folder).",
        ),
    ] = None,
    probe_init: Annotated[
        str,
        typer.Option(
            "--probe-init",
            help="How the cluster probe starts: kmeans (spherical k-means on the head's features, no labels) "
            "or random (the paper's, refined by modularity).",
        ),
    ] = "kmeans",
    probe_refine: Annotated[
        bool,
        typer.Option(
            "--probe-refine/--no-probe-refine",
            help="Refine the k-means centroids by the paper's modularity objective (a random start always is).",
        ),
    ] = False,
    probe_space: Annotated[
        str,
        typer.Option(
            "--probe-space",
            help="Where the cluster probe clusters: whitened (the head's features whitened by a fit on the "
            "training images, no labels) or head (the head's features, the paper's).",
        ),
    ] = "whitened",
    probe_restarts: Annotated[
        int | None,
        typer.Option(
            "--probe-restarts",
            help="Starts of the cluster probe: k-means restarts (best mean cosine kept; default 8; given alone, "
            "it turns the consensus off) or random starts (best modularity kept; default 1).",
        ),
    ] = None,
    probe_consensus: Annotated[
        int | None,
        typer.Option(
            "--probe-consensus",
            help="k-means start only: the consensus of this many single-start fits (points go together when "
            "most fits put them together; default 16) instead of the restart of best mean cosine; 0, or "
            "--probe-restarts alone, keeps the best restart.",
        ),
    ] = None,
    probe_spread: Annotated[
        str,
        typer.Option(
            "--probe-spread",
            help="k-means start only: give the clusters a spread (equal Gaussians sharing one diagonal "
            "covariance) where the consensus' fits agree on under 85% of the points (auto), always (on) or "
            "never (off).",
        ),
    ] = "auto",
    probe_upsampling: Annotated[
        str,
        typer.Option(
            "--probe-upsampling",
            help="How label maps reach pixel size: score every token and upsample the scores (scores), or "
            "upsample the head's features and score every pixel (features, the paper's).",
        ),
    ] = "scores",
    cache_features: Annotated[
        str,
        typer.Option(
            "--cache-features",
            help="Compute the frozen backbone's tokens once (float16 on disk) for all epochs and steps: auto "
            "(when they are read more than once and fit on the disk; on a GPU, in memory), on or off.",
        ),
    ] = "auto",
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run from its last checkpoint (needs only --run)."),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Train the --run folder over from the start: once every option and input is checked, the "
            "files an earlier training and evaluation wrote there are removed (only files cause recorded as "
            "its own and that are unchanged since; without it, a run trained with other settings is refused).",
        ),
    ] = False,
    checkpoint_every: Annotated[
        float, typer.Option("--checkpoint-every", help="Seconds between resumable checkpoints (0: every batch).")
    ] = 60.0,
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            help="default: labels train nothing but the linear probe. reference: the reference code's recipe "
            "exactly (lr x 4 on a quarter of each epoch, its clipping, MLP steps 2-3 at 224) including its "
            "label leak: the linear probe's cross-entropy trains the teacher head in step 3.",
        ),
    ] = "default",
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout of the heads (the paper's 0.1).")] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    loader_workers: Annotated[
        int | None,
        typer.Option(
            "--loader-workers",
            help="Processes loading images (0: in this process; default: none on the CPU, up to 8 per GPU).",
        ),
    ] = None,
    gpus: Annotated[
        int,
        typer.Option(
            "--gpus",
            min=1,
            help="Train data-parallel in this many processes, one per GPU, started through torchrun; "
            "--batch-size is per process. With --device cpu: CPU processes (gloo).",
        ),
    ] = 1,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the three CAUSE steps: clusterbook, head (front door), cluster probe.

    A step whose output already exists in the run folder is skipped, so a run can be
    extended or finished later. Labels, when present, train only the linear probe.

    Example: cause train --data-dir ./my-images --num-classes 8 --run runs/mine
    """
    require_at_least(0, loader_workers=loader_workers)
    from ..config import TrainConfig
    from ..paths import next_numbered_folder, runs_home
    from ..training import train as train_run
    from ..training.distributed import from_environment

    if resume and run is None:
        raise CauseError("--resume needs the run folder to continue: --run R.")
    if resume and overwrite:
        raise CauseError("--resume continues a run and --overwrite starts it over: give one of them.")
    process = from_environment()
    if process.distributed and run is None:
        # Each process would number a folder of its own (on other machines, other numbers).
        raise CauseError("Processes started by torchrun write one run together: give it with --run.")
    if gpus > 1 and not process.distributed:
        _launch_training(ctx, gpus, run or next_numbered_folder(runs_home(), "train"), device)
        return
    from ..devices import keep_freed_memory

    keep_freed_memory()  # this process is the training's own: its allocator may keep what it frees
    if resume:
        assert run is not None
        from ..runs import open_run

        config = open_run(run).config()
        config.checkpoint_seconds = checkpoint_every
        config.precision = precision
        _print_training(train_run(config, run, device, _reporter(quiet or json_output), resume=True), json_output)
        return
    if data_dir is None:
        raise CauseError("Say where the images are with --data-dir.")
    config = TrainConfig(
        data_dir=str(data_dir),
        dataset=dataset,
        backbone=backbone,
        head=head,
        num_classes=num_classes,
        resolution=resolution,
        batch_size=batch_size,
        clusterbook_size=clusterbook_size,
        reduced_dim=reduced_dim,
        epochs_clusterbook=epochs_clusterbook,
        epochs_front_door=epochs_front_door,
        epochs_cluster_probe=epochs_cluster_probe,
        min_updates=min_updates,
        positive_threshold=positive_threshold,
        negative_threshold=negative_threshold,
        dropout=dropout,
        seed=seed,
        workers=loader_workers,
        recipe=recipe,
        probe_init=probe_init,
        probe_refine=probe_refine,
        probe_space=probe_space,
        probe_restarts=probe_restarts,
        probe_consensus=probe_consensus,
        probe_spread=probe_spread,
        probe_upsampling=probe_upsampling,
        cache_features=cache_features,
        checkpoint_seconds=checkpoint_every,
        precision=precision,
    )
    run_path = run or next_numbered_folder(runs_home(), "train")
    _print_training(
        train_run(config, run_path, device, _reporter(quiet or json_output), overwrite=overwrite), json_output
    )


def _print_training(run: Any, json_output: bool) -> None:
    """The trained run's summary, from the main process only."""
    from ..training.distributed import from_environment

    if not from_environment().is_main:
        return
    if json_output:
        info = run.read_run_info()
        summary: dict[str, Any] = {
            "run": str(run.path),
            "files": sorted(p.name for p in run.path.iterdir() if p.is_file() and not p.name.startswith(".")),
        }
        summary.update({key: info.get(key) for key in ("num_classes", "schedule", "backbone", "config")})
        print(json_text(summary))
        return
    stderr.print(f"run written to {run.path}")


def _launch_training(ctx: typer.Context, processes: int, run: Path, device: str) -> None:
    """Start this same ``cause train`` in ``processes`` processes through torchrun."""
    from ..training.distributed import REFERENCE_RECIPE_ALONE

    if ctx.params.get("recipe") == "reference":
        raise CauseError(REFERENCE_RECIPE_ALONE)
    _relaunch(ctx, processes, device, ["--run", str(run)], passed_on_elsewhere=("run",), what="Training")


@app.command(cls=CauseCommand)
@user_errors
def prepare(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="The dataset folder.")],
    dataset: Annotated[str, typer.Option("--dataset", help=DATASET_HELP)] = "folder",
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads cropping and writing (default: one per CPU).", min=1)
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Write the paper's training crops once; cause train then trains on them.

    Five-crop at 0.5 for cocostuff27, cityscapes and folder; ten-crop at 0.5 and 0.8 for
    cocostuff81/171; ten-crop at 0.3 to 0.7 for voc2012. Run it again after an interruption
    to finish; unreadable images are skipped and listed.

    Example: cause prepare --dataset cocostuff27 --data-dir ~/datasets
    """
    from ..data.preparing import prepare_crops

    summary = prepare_crops(dataset, data_dir, threads, _reporter(quiet))
    if summary.made_elsewhere:
        stdout.print(
            f"{summary.folder} already holds {summary.crops:,} crops (not made by cause prepare); kept",
            highlight=False,
            soft_wrap=True,
        )
        return
    if summary.already_prepared:
        stdout.print(
            f"{summary.folder} already holds the {summary.crops:,} prepared crops", highlight=False, soft_wrap=True
        )
        return
    table = Table(title=f"cause prepare {dataset}")
    for column in ("images", "already done", "cropped now", "skipped", "crops", "folder"):
        table.add_column(column, justify="left" if column == "folder" else "right")
    table.add_row(
        f"{summary.images:,}",
        f"{summary.done_before:,}",
        f"{summary.written:,}",
        f"{len(summary.skipped):,}",
        f"{summary.crops:,}",
        str(summary.folder),
    )
    stdout.print(table)
    for path, reason in summary.skipped:
        stderr.print(f"skipped {path}: {reason}", highlight=False, soft_wrap=True)
    for line in summary.unknown_lines(dataset):
        stderr.print(line, highlight=False, soft_wrap=True)
