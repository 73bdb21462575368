"""cause info, cause fetch and cause demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .._version import __version__
from ..paths import json_text
from .base import (
    CauseCommand,
    DeviceOption,
    JsonOption,
    QuietOption,
    _reporter,
    app,
    stdout,
    user_errors,
)
from .evaluate import print_metrics


@app.command(cls=CauseCommand)
@user_errors
def info(
    json_output: JsonOption = False,
) -> None:
    """Show versions, devices, whether the dense CRF is available, and where files go.

    Example: cause info
    """
    import importlib.metadata
    import importlib.util

    import torch

    from ..paths import cache_home, runs_home

    pydensecrf_installed = importlib.util.find_spec("pydensecrf") is not None
    details: dict[str, Any] = {
        "cause": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "dense_crf": pydensecrf_installed,
        "crf_backends": ["pydensecrf", "torch"] if pydensecrf_installed else ["torch"],
        "cache_dir": str(cache_home()),
        "runs_dir": str(runs_home().resolve()),
    }
    for package in ("timm", "huggingface_hub", "safetensors", "numpy"):
        try:  # the installed version, without the seconds an import of timm takes
            details[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            details[package] = "not installed"
    if json_output:
        print(json_text(details))
        return
    table = Table(title="cause info", show_header=False)
    for key, value in details.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    stdout.print(table)


@app.command(cls=CauseCommand)
@user_errors
def fetch(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Backbones: names from --list, timm model names, or hf-hub:ORG/NAME ids."),
    ] = None,
    list_backbones: Annotated[bool, typer.Option("--list", help="List the known backbones and exit.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision to pin: a branch, tag or commit.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="The toolkit's cache (default: $CAUSE_HOME, else ~/.cache/cause)."),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file",
            help="Convert a checkpoint you downloaded instead (iBOT and MSN: the authors' release file).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even when cached.")] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Download self-supervised backbones into the toolkit's cache, verified, as safetensors.

    Downloads go through huggingface_hub, so HF_TOKEN (or hf auth login), HF_HOME, HF_ENDPOINT
    and HF_HUB_OFFLINE work as usual. A cached backbone is never requested again.

    iBOT and MSN are not on the Hub in timm's form: convert the authors' file with --from-file.

    Example: cause fetch dino-vits8 dinov2-vitb14

    Example: cause fetch ibot-vitb16 --from-file checkpoint_teacher.pth
    """
    from ..backbones import fetch_backbones
    from ..backbones import list_backbones as backbone_rows

    if list_backbones or not names:
        if json_output:
            print(json_text(backbone_rows(cache_dir)))
            return
        from rich import box

        table = Table(
            title="backbones",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
            caption="res: the paper's input size. *: the reference's 12-head ViT-S, same weights",
        )
        columns = ("name", "family", "patch", "width", "parameters", "resolution", "licence", "cached")
        headers = {"parameters": "params", "resolution": "res"}
        for column in columns:
            numeric = column in ("patch", "width", "parameters", "resolution")
            table.add_column(headers.get(column, column), justify="right" if numeric else "left", no_wrap=True)
        for row in backbone_rows(cache_dir):
            parameters = row["parameters"]
            row["parameters"] = "?" if parameters is None else f"{parameters / 1e6:.1f}M"
            row["cached"] = "yes" if row["cached"] else "no"
            if row["reference_heads"]:
                row["name"] += "*"
            table.add_row(*(str(row[column]) for column in columns))
        stdout.print(table)
        return
    fetched = fetch_backbones(
        names, revision, cache_dir=cache_dir, from_file=from_file, force=force, reporter=_reporter(quiet or json_output)
    )
    if json_output:
        print(json_text([{"name": spec.name, "path": str(path)} for spec, path in fetched]))
        return
    for spec, path in fetched:
        stdout.print(f"{spec.name}: {path}", highlight=False, soft_wrap=True)


def _dataset_class_names(dataset: str | None) -> list[str] | None:
    from ..data import dataset_class_names

    return dataset_class_names(dataset)


@app.command(cls=CauseCommand)
@user_errors
def demo(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for the demo's data, run and segments (default: runs/demo, or runs/demo2... when taken).",
        ),
    ] = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Make synthetic scenes, train CAUSE on the toy backbone, evaluate and segment: about a minute on a CPU.

    Example: cause demo --out /tmp/cause-demo
    """
    from ..demo import run_demo
    from ..paths import next_numbered_folder, runs_home

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
