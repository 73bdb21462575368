"""cause train and cause prepare."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..config import TrainConfig
from ..errors import CauseError
from ..paths import json_text
from ..settings import Setting
from .base import (
    DATASET_HELP,
    CauseCommand,
    PanelledCommand,
    QuietOption,
    _relaunch,
    _reporter,
    app,
    given_on_command_line,
    require_at_least,
    stderr,
    stdout,
    user_errors,
)

RUN_PANEL, SPEED_PANEL = "Run and output", "Speed"
TRAIN_HELP = """Train the three CAUSE steps: clusterbook, head (front door), cluster probe.

A step whose output already exists in the run folder is skipped, so a run can be extended or
finished later. Labels, when present, train only the linear probe. Each setting is its default,
or what --config FILE says, or the option given here, the last of these that there is.

Example: cause train --data-dir ./my-images --num-classes 8 --run runs/mine
"""


def _completion(accepted: tuple[str, ...]) -> Any:
    """Shell completion of a setting's choices; the value itself is checked with the other
    settings, so that a wrong one is one sentence like every other mistake."""

    def complete(incomplete: str) -> list[str]:
        return [value for value in accepted if value.startswith(incomplete)]

    return complete


def _setting_parameter(setting: Setting) -> inspect.Parameter:
    """The ``cause train`` option of one declared setting."""
    accepted = setting.accepted
    details: dict[str, Any] = {"help": setting.help, "rich_help_panel": setting.panel}
    details["show_default"] = setting.default_text()
    if setting.metavar:
        details["metavar"] = setting.metavar
    kind: Any = bool
    if setting.kind is bool:
        declaration = f"{setting.flag}/--no-{setting.flag.removeprefix('--')}"
    else:
        declaration, kind = setting.flag, setting.kind | None if setting.may_be_none else setting.kind
        if accepted:
            details["autocompletion"] = _completion(accepted)
            listed = "|".join(accepted)
            if len(listed) <= 24:
                details["metavar"] = f"[{listed}]"
            else:  # too wide beside the name: the choices go into the help
                details["metavar"] = "NAME"
                details["help"] += f" One of: {', '.join(accepted)}."
    annotation = Annotated[kind, typer.Option(declaration, **details)]
    return inspect.Parameter(
        setting.name, inspect.Parameter.KEYWORD_ONLY, default=setting.default, annotation=annotation
    )


def _option(
    name: str, declaration: tuple[str, ...], kind: Any, default: Any, panel: str, help: str
) -> inspect.Parameter:
    option = typer.Option(*declaration, help=help, rich_help_panel=panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])


def _train_parameters() -> list[inspect.Parameter]:
    """Every option of ``cause train``: those of the run, then one per declared setting."""
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    own = [
        _option("config_file", ("--config",), Path | None, None, RUN_PANEL,
                "Settings from a JSON, YAML or TOML file, or a run's run.json; options given here override it."),
        _option("run", ("--run",), Path | None, None, RUN_PANEL,
                "Run folder (default: runs/train, or runs/train2, runs/train3... when taken)."),
        _option("resume", ("--resume",), bool, False, RUN_PANEL,
                "Continue an interrupted run from its last checkpoint (needs only --run)."),
        _option("overwrite", ("--overwrite",), bool, False, RUN_PANEL,
                "Train the --run folder over from the start: once every option and input is checked, the files "
                "an earlier training and evaluation wrote there are removed (only files cause recorded as its own "
                "and that are unchanged since; without it, a run trained with other settings is refused)."),
        _option("json_output", ("--json",), bool, False, RUN_PANEL, "Print the result as one JSON object on stdout."),
        _option("quiet", ("--quiet", "-q"), bool, False, RUN_PANEL,
                "No progress bars or messages; the result (table or JSON) and errors still print."),
        _option("gpus", ("--gpus",), int, 1, SPEED_PANEL,
                "Train data-parallel in this many processes, one per GPU, started through torchrun; --batch-size "
                "is per process. With --device cpu: CPU processes (gloo)."),
        _option("device", ("--device",), str, "auto", SPEED_PANEL, "auto, cpu, cuda or cuda:N."),
    ]  # fmt: skip
    settings = [_setting_parameter(setting) for setting in TrainConfig.settings() if setting.on_command_line]
    return [context, *settings, *own]


def given_settings(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The settings given on this command line (not those left at their defaults)."""
    names = {setting.name for setting in TrainConfig.settings()}
    return {
        name: str(value) if name == "data_dir" else value
        for name, value in options.items()
        if name in names and given_on_command_line(ctx, name)
    }


def train(ctx: typer.Context, **options: Any) -> None:
    from ..config_files import read_settings_file
    from ..distributed import REFERENCE_RECIPE_ALONE, from_environment
    from ..paths import next_numbered_folder, runs_home
    from ..training import train as train_run

    run, resume, overwrite, gpus = options["run"], options["resume"], options["overwrite"], options["gpus"]
    device, config_file = options["device"], options["config_file"]
    json_output, quiet = options["json_output"], options["quiet"]
    require_at_least(1, gpus=gpus)
    given = given_settings(ctx, options)
    if resume and run is None:
        raise CauseError("--resume needs the run folder to continue: --run R.")
    if resume and overwrite:
        raise CauseError("--resume continues a run and --overwrite starts it over: give one of them.")
    if resume and config_file is not None:
        raise CauseError("--resume continues a run with its own settings; --config gives new ones: give one of them.")
    from_file = read_settings_file(config_file) if config_file is not None else {}
    process = from_environment()
    if process.distributed and run is None:
        # Each process would number a folder of its own (on other machines, other numbers).
        raise CauseError("Processes started by torchrun write one run together: give it with --run.")
    if gpus > 1 and not process.distributed:
        if {**from_file, **given}.get("recipe") == "reference":
            raise CauseError(REFERENCE_RECIPE_ALONE)
        run = run or next_numbered_folder(runs_home(), "train")
        _relaunch(ctx, gpus, device, ["--run", str(run)], passed_on_elsewhere=("run",), what="Training")
        return
    from ..devices import keep_freed_memory

    keep_freed_memory()  # this process is the training's own: its allocator may keep what it frees
    reporter = _reporter(quiet or json_output)
    if resume:
        assert run is not None
        from ..runs import open_run

        # How fast it goes may change on resuming; what it learns may not (checked on resuming).
        faster = {name: given[name] for name in ("checkpoint_seconds", "precision", "workers") if name in given}
        config = open_run(run).config().replace(**faster)
        _print_training(train_run(config, run, device, reporter, resume=True), json_output)
        return
    config = TrainConfig(**{**from_file, **given})
    run_path = run or next_numbered_folder(runs_home(), "train")
    _print_training(train_run(config, run_path, device, reporter, overwrite=overwrite), json_output)


train.__signature__ = inspect.Signature(_train_parameters())  # type: ignore[attr-defined]
app.command(name="train", cls=PanelledCommand, help=TRAIN_HELP)(user_errors(train))


def _print_training(run: Any, json_output: bool) -> None:
    """The trained run's summary, from the main process only."""
    from ..distributed import from_environment

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
