"""cause segment."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

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
    JsonOption,
    PrecisionOption,
    QuietOption,
    RunOption,
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
def segment(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="An image file, a folder (searched recursively), a glob pattern, or a .txt list of paths.",
        ),
    ],
    run: RunOption,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: runs/segment, or runs/segment2... when taken)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    crf: Annotated[
        bool,
        typer.Option("--crf/--no-crf", help="Refine with the dense CRF (flip averaged, as in evaluation)."),
    ] = False,
    crf_workers: CRFWorkersOption = None,
    crf_backend: CRFBackendOption = "auto",
    loader_workers: Annotated[
        int | None,
        typer.Option("--loader-workers", help="Image-decoding processes (default: none on the CPU, up to 8 on a GPU)."),
    ] = None,
    writer_threads: Annotated[
        int | None,
        typer.Option("--writer-threads", help="Threads that encode and write the outputs (default: one per CPU)."),
    ] = None,
    legend: Annotated[bool, typer.Option("--legend", help="Also write OUT/legend.png naming the colours.")] = False,
    save: Annotated[
        str,
        typer.Option(
            "--save",
            help="What to write, comma-separated: labels, overlays, scores (per pixel, the best cluster's "
            "probability and its lead over the second, float16 in compressed .npz).",
        ),
    ] = "labels,overlays",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Redo every input, replacing OUT's earlier outputs (without it, a rerun skips the inputs "
            "finished before, and OUT with another run's or other settings' outputs is refused).",
        ),
    ] = False,
    backbone: BackboneCheckOption = None,
    gpus: Annotated[
        int,
        typer.Option(
            "--gpus",
            min=1,
            help="Share the inputs among this many processes, one per GPU, started through torchrun; with "
            "--device cpu: CPU processes.",
        ),
    ] = 1,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Write a label map and a colour overlay for every image named by SOURCE.

    Labels are clusters, or classes once the run has been evaluated. Unreadable files are
    skipped and listed; the exit code stays 0.

    Example: cause segment ./photos --run runs/train --out segments --legend
    """
    require_at_least(1, batch_size=batch_size)
    require_at_least(0, crf_workers=crf_workers, loader_workers=loader_workers, writer_threads=writer_threads)
    if "torch" not in sys.modules:  # read once, when torch loads its OpenMP runtime
        # The writer threads share the CPUs with torch's, which wait for work by spinning
        # (OpenMP's active policy): on a 2-core CPU that cost segment a fifth of its speed.
        # Waiting passively costs the model nothing measurable (ViT-S/8: 3.31 and 3.33 images/s).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..devices import use_precision
    from ..distributed import from_environment
    from ..inference.outputs import parse_save
    from ..inference.segment import SegmentSettings, segment_images
    from ..paths import next_numbered_folder, runs_home

    process = from_environment()
    if process.distributed and out is None:
        raise CauseError("Processes started by torchrun write one output folder together: give it with --out.")
    out_path = out or next_numbered_folder(runs_home(), "segment")
    if gpus > 1 and not process.distributed:
        fixed = [source, "--run", str(run), "--out", str(out_path)]
        _relaunch(ctx, gpus, device, fixed, passed_on_elsewhere=("run", "out"), what="Segmenting")
        return
    with use_precision(precision):
        settings = SegmentSettings(
            device=device,
            batch_size=batch_size,
            crf=crf,
            crf_workers=crf_workers,
            crf_backend=crf_backend,
            loader_workers=loader_workers,
            writer_threads=writer_threads,
            legend=legend,
            save=parse_save(save),
            overwrite=overwrite,
            backbone=backbone,
        )
        result = segment_images(source, run, out_path, settings, _reporter(quiet or json_output))
    if not process.is_main:
        return
    if json_output:
        print(json_text(result))
        return
    table = Table(title="cause segment")
    table.add_column("images", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("s / image", justify="right")
    table.add_column("output")
    per_image = result["seconds_per_image"]
    table.add_row(
        str(result["written"]),
        str(len(result["skipped"])),
        "-" if per_image is None else f"{per_image:.3f}",
        str(out_path),
    )
    stdout.print(table)
    for skipped in result["skipped"]:
        stderr.print(f"skipped {skipped['input']}: {skipped['reason']}", highlight=False, soft_wrap=True)
