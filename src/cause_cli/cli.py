"""The ``cause`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from ._version import __version__
from .config import DEFAULT_MIN_UPDATES
from .errors import CauseError, Interrupted
from .interrupts import remembered_interrupts
from .paths import json_text

F = TypeVar("F", bound=Callable[..., Any])


def _plain_help(params: list[Any]) -> list[Any]:
    """Flags take no value, so --help shows no value placeholder for them."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class CauseCommand(TyperCommand):
    """A command whose usage line names its arguments as the help does (``SOURCE``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_help(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class CauseGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_help(super().get_params(ctx))


app = typer.Typer(
    name="cause",
    cls=CauseGroup,
    help=(
        "Unsupervised semantic segmentation with CAUSE (Causal Unsupervised Semantic Segmentation).\n\n"
        "Fetch a self-supervised backbone, train the three CAUSE steps on your images without labels, "
        "evaluate against labels when you have them, and segment folders of images.\n\n"
        "Try it in about a minute on a 2-core CPU: cause demo"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

stdout = Console()
stderr = Console(stderr=True)
DEBUG_ENV = "CAUSE_DEBUG"


def require_at_least(minimum: int, **values: int | None) -> None:
    """One sentence for a count option below ``minimum`` (``batch_size=0`` names --batch-size)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise CauseError(f"--{name.replace('_', '-')} must be at least {minimum}, not {value}.")


# Errors of the machine, not of the toolkit, that a user can act on: a full disk, a folder
# they may not write.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def user_errors(command: F) -> F:
    """Turn a :class:`CauseError`, or a full or unwritable disk, into one sentence on stderr
    and exit code 1; Ctrl-C, remembered while the command runs, into exit code 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with remembered_interrupts():
                return command(*args, **kwargs)
        except CauseError as error:
            if os.environ.get(DEBUG_ENV):
                raise
            stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as error:
            if os.environ.get(DEBUG_ENV) or error.errno not in _DISK_ERRORS:
                raise
            where = f" {error.filename}" if error.filename else ""
            sentence = f"could not write{where}: {error.strerror or error}; files written before are complete."
            stderr.print(f"[bold red]error:[/] {sentence}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as error:
            advice = f"; {error}" if isinstance(error, Interrupted) else ""
            stderr.print(f"interrupted; files already written are complete{advice}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        stdout.print(f"cause {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-sentence errors.")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if not os.environ.get(DEBUG_ENV):
        from .progress import show_warnings_as_notes

        show_warnings_as_notes(stderr)


def _reporter(quiet: bool) -> Any:
    from .progress import RichReporter

    return RichReporter(stderr, quiet=quiet)


DATASET_HELP = "Dataset layout: cocostuff27, cocostuff81, cocostuff171, cityscapes, voc2012 or folder."
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (float32 on the CPU, bfloat16 on GPUs that have it, else float16), float32, bfloat16 or float16.",
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress bars or messages; the result (table or JSON) and errors still print.",
    ),
]
CRFWorkersOption = Annotated[
    int | None,
    typer.Option("--crf-workers", help="CRF worker processes; 0 runs it in this process (default: one per CPU)."),
]
CRFBackendOption = Annotated[
    str,
    typer.Option(
        "--crf-backend",
        help="auto (torch on a GPU, pydensecrf on a CPU where it is installed, else torch), pydensecrf or torch.",
    ),
]
RunOption = Annotated[
    Path, typer.Option("--run", help="The run folder, or hf-hub:OWNER/NAME[@REVISION] for a run on the Hub.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
BackboneCheckOption = Annotated[
    str | None, typer.Option("--backbone", help="Default: the run's; another name is refused.")
]


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

    from .paths import cache_home, runs_home

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
    from .backbones import fetch_backbones
    from .backbones import list_backbones as backbone_rows

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
    from .config import TrainConfig
    from .paths import next_numbered_folder, runs_home
    from .training import train as train_run
    from .training.distributed import from_environment

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
    from .devices import keep_freed_memory

    keep_freed_memory()  # this process is the training's own: its allocator may keep what it frees
    if resume:
        assert run is not None
        from .runs import open_run

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
    from .training.distributed import from_environment

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
    from .training.distributed import REFERENCE_RECIPE_ALONE

    if ctx.params.get("recipe") == "reference":
        raise CauseError(REFERENCE_RECIPE_ALONE)
    _relaunch(ctx, processes, device, ["--run", str(run)], passed_on_elsewhere=("run",), what="Training")


def _relaunch(
    ctx: typer.Context,
    processes: int,
    device: str,
    fixed: list[str],
    passed_on_elsewhere: tuple[str, ...],
    what: str,
) -> None:
    """Start this same command in ``processes`` processes through torchrun, with ``fixed``
    arguments first (those every process must agree on) and the other options as given."""
    import torch

    from .devices import resolve_device
    from .training.distributed import launch

    available = torch.cuda.device_count()
    if resolve_device(device).type == "cuda":
        if available < processes:
            raise CauseError(f"--gpus {processes} asks for more GPUs than this machine has ({available}).")
    elif device != "cpu":
        raise CauseError(
            f"--gpus {processes} needs GPUs and this machine has none; --device cpu runs CPU processes instead."
        )
    # The options given on this command line, passed on as they came; the others default alike.
    arguments: list[str] = [ctx.info_name or "", *fixed]
    for option in ctx.command.params:
        if option.param_type_name != "option" or option.name in ("gpus", *passed_on_elsewhere, None):
            continue
        if option.name not in ctx.params or ctx.params[option.name] is None:
            continue
        value = ctx.params[option.name]
        if getattr(option, "is_flag", False):
            arguments += [option.opts[0]] if value else []
        else:
            arguments += [option.opts[0], str(value)]
    status = launch(processes, arguments)
    if status != 0:
        raise CauseError(f"{what} in {processes} processes failed (exit status {status}); their messages are above.")


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
    from .data.preparing import prepare_crops

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
    from .devices import use_precision
    from .inference.crf import default_workers
    from .inference.evaluate import evaluate_run
    from .runs import HUB_RUN_PREFIX

    from_hub = str(run).startswith(HUB_RUN_PREFIX)

    with use_precision(precision):
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
            crf_workers=default_workers() if crf_workers is None else crf_workers,
            crf_backend=crf_backend,
            backbone=backbone,
            baselines=baselines,
            write=not from_hub,
        )
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
    from .devices import use_precision
    from .inference.crf import default_workers
    from .inference.outputs import parse_save
    from .inference.segment import segment_images
    from .paths import next_numbered_folder, runs_home
    from .training.distributed import from_environment

    process = from_environment()
    if process.distributed and out is None:
        raise CauseError("Processes started by torchrun write one output folder together: give it with --out.")
    out_path = out or next_numbered_folder(runs_home(), "segment")
    if gpus > 1 and not process.distributed:
        fixed = [source, "--run", str(run), "--out", str(out_path)]
        _relaunch(ctx, gpus, device, fixed, passed_on_elsewhere=("run", "out"), what="Segmenting")
        return
    with use_precision(precision):
        result = segment_images(
            source,
            run,
            out_path,
            device,
            batch_size,
            _reporter(quiet or json_output),
            crf=crf,
            crf_workers=default_workers() if crf_workers is None else crf_workers,
            crf_backend=crf_backend,
            legend=legend,
            backbone=backbone,
            overwrite=overwrite,
            save=parse_save(save),
            loader_workers=loader_workers,
            writer_threads=writer_threads,
        )
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
    from .sharing import push_run

    url = push_run(run, repo_id, private, revision, message, accept_backbone_licence)
    stdout.print(f"pushed {run} to {repo_id}: {url}", highlight=False, soft_wrap=True)


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
    from .inference.report import write_report
    from .runs import METRICS_FILE, REPORT_FILE, open_run

    directory = open_run(run)
    if directory.hub_id is not None:
        raise CauseError(f"{run} is read from the Hub's cache; copy it to a folder first and write its report there.")
    if not directory.has(METRICS_FILE):
        raise CauseError(f"{directory.file(METRICS_FILE)} is missing: run cause eval --run {run} first.")
    with directory.writing("report"):
        directory.owned.refuse_unless_ours([REPORT_FILE], f"move it away, or report on a copy of {run}")
        path = write_report(directory)
    stdout.print(f"wrote {path}", highlight=False, soft_wrap=True)


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
    from .inference.export import description_path, export_run

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
    from .importer import find_reference_files
    from .importer import import_reference as convert
    from .paths import next_numbered_folder, runs_home

    files = find_reference_files(folder, head, segment_file, cluster_file, modular_file)
    run_path = run or next_numbered_folder(runs_home(), "import")
    imported = convert(files, backbone, run_path, dataset=dataset, class_names=_dataset_class_names(dataset))
    if json_output:
        info = imported.read_run_info()
        print(json_text({"run": str(run_path), "head": files.head, **info}))
        return
    stderr.print(f"imported the {files.head.upper()} head into {run_path} (backbone {imported.config().backbone})")


def _dataset_class_names(dataset: str | None) -> list[str] | None:
    from .data import dataset_class_names

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
