"""cause eval and cause report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import CauseError
from ..paths import json_text
from .base import (
    BackboneCheckOption,
    CauseCommand,
    CRFBackendOption,
    CRFWorkersOption,
    DeviceOption,
    PrecisionOption,
    QuietOption,
    RunOption,
    _reporter,
    app,
    require_at_least,
    stderr,
    stdout,
    user_errors,
)


@app.command(name="eval", cls=CauseCommand)
@user_errors
def evaluate(
    run: RunOption,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Default: the run's.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Default: the run's.")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or all.")] = "val",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    crf: Annotated[
        bool | None,
        typer.Option("--crf/--no-crf", help="Also report results after the dense CRF (default: on)."),
    ] = None,
    crf_workers: CRFWorkersOption = None,
    crf_backend: CRFBackendOption = "auto",
    loader_workers: Annotated[
        int | None,
        typer.Option("--loader-workers", help="Image-loading processes (default: none on the CPU, up to 8 on a GPU)."),
    ] = None,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines/--no-baselines",
            help="Also score k-means on the backbone's tokens and on the head's features (fitted on the training "
            "split without labels), so you see what training added.",
        ),
    ] = True,
    backbone: BackboneCheckOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a run: cluster mIoU and pixel accuracy after Hungarian matching, with and without
    the dense CRF, per-class IoU, and the linear probe's figures.

    Follows the reference's protocol: without CRF the image alone; with CRF the image and its
    flip averaged, then the CRF. Writes RUN/metrics.json, RUN/confusion.png and RUN/samples.png.

    Example: cause eval --run runs/train
    """
    require_at_least(1, batch_size=batch_size)
    require_at_least(0, crf_workers=crf_workers, loader_workers=loader_workers)
    from ..devices import use_precision
    from ..inference.evaluate import EvaluationSettings, evaluate_run
    from ..runs import HUB_RUN_PREFIX

    from_hub = str(run).startswith(HUB_RUN_PREFIX)

    with use_precision(precision):
        settings = EvaluationSettings(
            dataset=dataset,
            data_dir=str(data_dir) if data_dir else None,
            split=split,
            device=device,
            batch_size=batch_size,
            crf=crf,
            crf_workers=crf_workers,
            crf_backend=crf_backend,
            loader_workers=loader_workers,
            baselines=baselines,
            backbone=backbone,
        )
        result = evaluate_run(run, settings, _reporter(quiet or json_output), write=not from_hub)
    if from_hub and not json_output:
        stderr.print(f"{run} is read from the Hub's cache: the metrics are printed, not written into it")
    if json_output:
        print(json_text(result))
        return
    print_metrics(result)


def print_metrics(result: dict[str, Any]) -> None:
    ignored = result.get("ignored_above_classes")
    caption = (
        f"{ignored['pixels']:,} labelled pixels with class ids at or above {result['num_classes']} were ignored"
        if ignored
        else None
    )
    table = Table(title=f"{result['images']} images, {result['split']} split", caption=caption)
    table.add_column("")
    table.add_column("mIoU %", justify="right")
    table.add_column("pixel accuracy %", justify="right")
    table.add_row("clusters (Hungarian)", f"{result['miou']:.1f}", f"{result['pixel_accuracy']:.1f}")
    if result.get("crf"):
        crf = result["crf"]
        table.add_row("clusters + CRF (flip averaged)", f"{crf['miou']:.1f}", f"{crf['pixel_accuracy']:.1f}")
    linear = result["linear_probe"]
    table.add_row("linear probe (labels)", f"{linear['miou']:.1f}", f"{linear['pixel_accuracy']:.1f}")
    if result.get("baselines"):
        for key, title in (
            ("kmeans_tokens", "k-means on backbone tokens"),
            ("kmeans_head", "k-means on head features"),
        ):
            scores = result["baselines"][key]
            table.add_row(f"baseline: {title}", f"{scores['miou']:.1f}", f"{scores['pixel_accuracy']:.1f}")
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


@app.command(cls=CauseCommand)
@user_errors
def report(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="The evaluated run folder.")],
) -> None:
    """Write RUN/report.html again from the run's metrics and pictures: one page that opens
    offline, with the figures, per-class IoU, validation images, confusion matrix, training
    curves and settings. cause eval writes it too.

    Example: cause report runs/photos
    """
    from ..inference.report import write_report
    from ..runs import METRICS_FILE, REPORT_FILE, open_run

    directory = open_run(run)
    if directory.hub_id is not None:
        raise CauseError(f"{run} is read from the Hub's cache; copy it to a folder first and write its report there.")
    if not directory.has(METRICS_FILE):
        raise CauseError(f"{directory.file(METRICS_FILE)} is missing: run cause eval --run {run} first.")
    with directory.writing("report"):
        directory.owned.refuse_unless_ours([REPORT_FILE], f"move it away, or report on a copy of {run}")
        path = write_report(directory)
    stdout.print(f"wrote {path}", highlight=False, soft_wrap=True)
