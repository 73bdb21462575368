"""The ``cause`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import CauseError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="cause",
    help=(
        "Unsupervised semantic segmentation with CAUSE (Causal Unsupervised Semantic Segmentation).\n\n"
        "Fetch a self-supervised backbone, train the three CAUSE steps on your images without labels, "
        "evaluate against labels when you have them, and segment folders of images.\n\n"
        "Try it in three minutes on a CPU: cause demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

stdout = Console()
stderr = Console(stderr=True)
DEBUG_ENV = "CAUSE_DEBUG"


def user_errors(command: F) -> F:
    """Turn a :class:`CauseError` into one sentence on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CauseError as error:
            if os.environ.get(DEBUG_ENV):
                raise
            stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("interrupted; files already written are complete")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        stdout.print(f"cause {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-sentence errors.")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _reporter(quiet: bool) -> Any:
    from .progress import RichReporter

    return RichReporter(stderr, quiet=quiet)


DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
RunOption = Annotated[Path, typer.Option("--run", help="The run folder.")]


@app.command()
@user_errors
def info(json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Show versions, devices, whether the dense CRF is available, and where files go.

    Example: cause info
    """
    import importlib.util

    import torch

    from .paths import cache_home, runs_home

    details: dict[str, Any] = {
        "cause": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "dense_crf": importlib.util.find_spec("pydensecrf") is not None,
        "cache_dir": str(cache_home()),
        "runs_dir": str(runs_home().resolve()),
    }
    for package in ("timm", "huggingface_hub", "safetensors", "numpy"):
        module = __import__(package)
        details[package] = getattr(module, "__version__", "?")
    if json_output:
        print(json.dumps(details))
        return
    table = Table(title="cause info", show_header=False)
    for key, value in details.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    stdout.print(table)


@app.command()
@user_errors
def fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Backbone names, e.g. toy or dino-vits8.")] = None,
    list_backbones: Annotated[bool, typer.Option("--list", help="List the known backbones.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision to pin.")] = None,
) -> None:
    """Download self-supervised backbones into the cache (CAUSE_HOME, default ~/.cache/cause).

    Example: cause fetch dino-vits8
    """
    from .backbones import REGISTRY, resolve_spec, weights_path
    from .backbones import fetch as fetch_backbone

    if list_backbones or not names:
        table = Table(title="backbones")
        for column in ("name", "family", "patch", "width", "resolution", "licence", "cached"):
            table.add_column(column)
        for spec in REGISTRY.values():
            cached = "yes" if weights_path(spec).exists() else "no"
            table.add_row(
                spec.name, spec.family, str(spec.patch_size), str(spec.dim), str(spec.resolution), spec.licence, cached
            )
        stdout.print(table)
        return
    for name in names:
        spec = resolve_spec(name)
        path = fetch_backbone(spec, revision)
        stdout.print(f"{name}: {path}")


@app.command()
@user_errors
def train(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="The dataset folder.")],
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset layout: folder.")] = "folder",
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone name (see cause fetch --list).")] = "toy",
    run: Annotated[Path | None, typer.Option("--run", help="Run folder (default: a new runs/trainN).")] = None,
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
    epochs_clusterbook: Annotated[int, typer.Option("--epochs-clusterbook")] = 1,
    epochs_front_door: Annotated[int, typer.Option("--epochs-front-door")] = 2,
    epochs_cluster_probe: Annotated[
        int | None, typer.Option("--epochs-cluster-probe", help="Default: 1 for mlp, 5 for tr.")
    ] = None,
    positive_threshold: Annotated[
        float, typer.Option("--positive-threshold", help="Concept similarity above which two tokens are positives.")
    ] = 0.3,
    negative_threshold: Annotated[
        float, typer.Option("--negative-threshold", help="Concept similarity below which two tokens are negatives.")
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Train the three CAUSE steps: clusterbook, head (front door), cluster probe.

    A step whose output already exists in the run folder is skipped, so a run can be
    extended or finished later. Labels, when present, train only the linear probe.

    Example: cause train --data-dir ./my-images --num-classes 8 --run runs/mine
    """
    from .config import TrainConfig
    from .paths import next_numbered_folder, runs_home
    from .train import train as train_run

    config = TrainConfig(
        data_dir=str(data_dir),
        dataset=dataset,
        backbone=backbone,
        head=head,
        num_classes=num_classes,
        resolution=resolution,
        batch_size=batch_size,
        clusterbook_size=clusterbook_size,
        epochs_clusterbook=epochs_clusterbook,
        epochs_front_door=epochs_front_door,
        epochs_cluster_probe=epochs_cluster_probe,
        positive_threshold=positive_threshold,
        negative_threshold=negative_threshold,
        seed=seed,
        workers=workers,
    )
    run_path = run or next_numbered_folder(runs_home(), "train")
    train_run(config, run_path, device, _reporter(quiet))
    stderr.print(f"run written to {run_path}")


@app.command(name="eval")
@user_errors
def evaluate(
    run: RunOption,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Default: the run's.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Default: the run's.")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or all.")] = "val",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    crf: Annotated[
        bool | None,
        typer.Option("--crf/--no-crf", help="Also report results after the dense CRF (default: when installed)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="CRF worker processes; 0 runs it in this process (default: one per CPU)."),
    ] = None,
    loader_workers: Annotated[int, typer.Option("--loader-workers", help="DataLoader worker processes.")] = 0,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a run: cluster mIoU and pixel accuracy after Hungarian matching, with and without
    the dense CRF, per-class IoU, and the linear probe's figures.

    Follows the reference's protocol: without CRF the image alone; with CRF the image and its
    flip averaged, then the CRF. Writes RUN/metrics.json, RUN/confusion.png and RUN/samples.png.

    Example: cause eval --run runs/train
    """
    from .crf import default_workers
    from .evaluate import evaluate_run

    result = evaluate_run(
        run,
        dataset,
        str(data_dir) if data_dir else None,
        split,
        device,
        batch_size,
        loader_workers,
        _reporter(quiet or json_output),
        crf=crf,
        crf_workers=default_workers() if workers is None else workers,
    )
    if json_output:
        print(json.dumps(result))
        return
    print_metrics(result)


def print_metrics(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['images']} images, {result['split']} split")
    table.add_column("")
    table.add_column("mIoU %", justify="right")
    table.add_column("pixel accuracy %", justify="right")
    table.add_row("clusters (Hungarian)", f"{result['miou']:.1f}", f"{result['pixel_accuracy']:.1f}")
    if result.get("crf"):
        crf = result["crf"]
        table.add_row("clusters + CRF (flip averaged)", f"{crf['miou']:.1f}", f"{crf['pixel_accuracy']:.1f}")
    linear = result["linear_probe"]
    table.add_row("linear probe", f"{linear['miou']:.1f}", f"{linear['pixel_accuracy']:.1f}")
    stdout.print(table)
    per_class = Table(title="IoU per class %")
    per_class.add_column("class")
    columns = [("clusters", result["iou_per_class"]), ("linear probe", result["linear_probe"]["iou_per_class"])]
    if result.get("crf"):
        columns.insert(1, ("with CRF", result["crf"]["iou_per_class"]))
    for title, _ in columns:
        per_class.add_column(title, justify="right")
    for name in result["iou_per_class"]:
        cells = [column[name] for _, column in columns]
        per_class.add_row(name, *("-" if value is None else f"{value:.1f}" for value in cells))
    stdout.print(per_class)


@app.command()
@user_errors
def segment(
    source: Annotated[
        str,
        typer.Argument(help="An image file, a folder (searched recursively), a glob pattern, or a .txt list of paths."),
    ],
    run: RunOption,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: a new runs/segmentN).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    crf: Annotated[
        bool, typer.Option("--crf", help="Refine with the dense CRF (flip averaged, as in evaluation).")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="CRF worker processes; 0 runs it in this process.")] = 0,
    legend: Annotated[bool, typer.Option("--legend", help="Also write OUT/legend.png naming the colours.")] = False,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Write a label map and a colour overlay for every image named by SOURCE.

    Labels are clusters, or classes once the run has been evaluated. Unreadable files are
    skipped and listed; the exit code stays 0.

    Example: cause segment ./photos --run runs/train --out segments --legend
    """
    from .paths import next_numbered_folder, runs_home
    from .segment import segment_images

    out_path = out or next_numbered_folder(runs_home(), "segment")
    result = segment_images(
        source, run, out_path, device, batch_size, _reporter(quiet), crf=crf, crf_workers=workers, legend=legend
    )
    table = Table(title="cause segment")
    table.add_column("images", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("s / image", justify="right")
    table.add_column("output")
    per_image = result["seconds_per_image"]
    table.add_row(
        str(len(result["outputs"])),
        str(len(result["skipped"])),
        "-" if per_image is None else f"{per_image:.3f}",
        str(out_path),
    )
    stdout.print(table)
    for skipped in result["skipped"]:
        stderr.print(f"skipped {skipped['input']}: {skipped['reason']}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def demo(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the demo's data, run and segments (default: a new runs/demoN)."),
    ] = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Make synthetic scenes, train CAUSE on the toy backbone, evaluate and segment, in minutes on a CPU.

    Example: cause demo --out /tmp/cause-demo
    """
    from .demo import run_demo
    from .paths import next_numbered_folder, runs_home

    out_path = out or next_numbered_folder(runs_home(), "demo")
    summary = run_demo(out_path, device, _reporter(quiet))
    print_metrics(summary["metrics"])
    table = Table(title="cause demo")
    table.add_column("what")
    table.add_column("value")
    table.add_row("mIoU (clusters, no CRF)", f"{summary['metrics']['miou']:.1f} %")
    table.add_row("pixel accuracy", f"{summary['metrics']['pixel_accuracy']:.1f} %")
    table.add_row("time", f"{summary['seconds']:.0f} s")
    table.add_row("run", summary["run"])
    table.add_row("segments", summary["segments"])
    stdout.print(table)


def run() -> None:
    app()
