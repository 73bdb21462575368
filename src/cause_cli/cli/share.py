"""cause push, cause export and cause import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..paths import json_text
from .base import (
    CauseCommand,
    JsonOption,
    app,
    stderr,
    stdout,
    user_errors,
)
from .basics import _dataset_class_names


@app.command(cls=CauseCommand)
@user_errors
def push(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="The trained run folder.")],
    repo_id: Annotated[str, typer.Argument(metavar="OWNER/NAME", help="The Hub repository (created when missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="The branch to push to (default: main).")] = None,
    message: Annotated[str | None, typer.Option("--message", help="The commit message.")] = None,
    accept_backbone_licence: Annotated[
        bool,
        typer.Option(
            "--accept-backbone-licence",
            help="Push a run whose backbone's licence restricts use (non-commercial, gated); the card says so.",
        ),
    ] = False,
) -> None:
    """Upload a trained run to the Hugging Face Hub with a model card, for anyone to use as
    --run hf-hub:OWNER/NAME.

    Uploads run.json, the weights (safetensors), metrics.json and the pictures when there, and
    README.md; never resume checkpoints, feature caches, the training log or images. The token
    comes from HF_TOKEN or `hf auth login`.

    Example: cause push runs/photos me/photos-cause
    """
    from ..sharing import push_run

    url = push_run(run, repo_id, private, revision, message, accept_backbone_licence)
    stdout.print(f"pushed {run} to {repo_id}: {url}", highlight=False, soft_wrap=True)


@app.command(name="export", cls=CauseCommand)
@user_errors
def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="The trained run folder.")],
    export_format: Annotated[str, typer.Option("--format", help="onnx.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="The file to write (default: RUN/model.onnx).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Export a run (backbone, head and cluster probe) as one ONNX graph: normalised images in,
    cluster scores and labels out, with a dynamic batch; checked in ONNX Runtime before it is kept.

    Not exported: the dense CRF, image reading and resizing (GRAPH.json, beside the graph, says how to prepare
    the input). Needs the export extra: pip install "cause-cli[export]".

    Example: cause export runs/photos --out photos.onnx
    """
    from ..inference.export import description_path, export_run

    target = out or run / f"model.{export_format}"
    description = export_run(run, target, export_format)
    if json_output:
        print(json_text(description))
        return
    check = description["check"]
    stdout.print(
        f"{target}: {description['bytes'] / 2**20:.1f} MiB, {description['resolution']} px, "
        f"agrees with the toolkit on {check['pixels_agreeing']:.4%} of the check's pixels; "
        f"described in {description_path(target)}",
        highlight=False,
        soft_wrap=True,
    )


@app.command(name="import", cls=CauseCommand)
@user_errors
def import_reference(
    backbone: Annotated[
        str, typer.Option("--backbone", help="The backbone the reference trained on (ViT-S: its 12-head variant).")
    ],
    folder: Annotated[
        Path | None,
        typer.Argument(
            metavar="FOLDER", help="The reference's CAUSE/ folder, or a folder holding its files side by side."
        ),
    ] = None,
    run: Annotated[
        Path | None, typer.Option("--run", help="New run folder (default: runs/import, or runs/import2... when taken).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="The dataset it was trained on (names the classes).")
    ] = None,
    head: Annotated[str | None, typer.Option("--head", help="mlp or tr, when the folder holds both.")] = None,
    segment_file: Annotated[Path | None, typer.Option("--segment", help="segment_mlp.pth or segment_tr.pth.")] = None,
    cluster_file: Annotated[Path | None, typer.Option("--cluster", help="cluster_mlp.pth or cluster_tr.pth.")] = None,
    modular_file: Annotated[Path | None, typer.Option("--modular", help="modular.npy (the clusterbook).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Import heads trained by the reference CAUSE code as a run of this toolkit.

    Reads segment_{mlp,tr}.pth, cluster_{mlp,tr}.pth and modular.npy in the reference's layout
    (CAUSE/<dataset>/<backbone>/<K>/ and CAUSE/<dataset>/modularity/<backbone>/<K>/), side by
    side, or named one by one; tensors only, nothing in them is executed.

    Example: cause import CAUSE/cocostuff27 --backbone dino-vitb8 --dataset cocostuff27 --run runs/ref
    """
    from ..importer import find_reference_files
    from ..importer import import_reference as convert
    from ..paths import next_numbered_folder, runs_home

    files = find_reference_files(folder, head, segment_file, cluster_file, modular_file)
    run_path = run or next_numbered_folder(runs_home(), "import")
    imported = convert(files, backbone, run_path, dataset=dataset, class_names=_dataset_class_names(dataset))
    if json_output:
        info = imported.read_run_info()
        print(json_text({"run": str(run_path), "head": files.head, **info}))
        return
    stderr.print(f"imported the {files.head.upper()} head into {run_path} (backbone {imported.config().backbone})")
