"""What every command shares: the app, its help classes, the one-sentence errors, common options."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from .._version import __version__
from ..errors import CauseError, Interrupted
from ..interrupts import remembered_interrupts

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



class PanelledCommand(CauseCommand):
    """Help in panels by purpose, each option's names on a line of their own and its help
    below them: at 80 columns no name is cut and no description squeezed into a narrow column."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from rich.console import Group
        from rich.padding import Padding
        from rich.panel import Panel
        from rich.text import Text

        console = Console(highlight=False)
        usage = " ".join(self.collect_usage_pieces(ctx))
        console.print(Padding(Text.assemble(("Usage: ", "bold"), f"{ctx.command_path} {usage}"), (1, 1, 0, 1)))
        for paragraph in (self.help or "").strip().split("\n\n"):
            console.print(Padding(Text(" ".join(paragraph.split())), (1, 1, 0, 1)))
        console.print()
        panels: dict[str, list[Any]] = {}
        for param in self.get_params(ctx):
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(param)
        for title, params in panels.items():
            entries: list[Any] = []
            for param in params:
                entries.append(Text(option_names(param, ctx), style="bold cyan"))
                entries.append(Padding(Text(option_help(param)), (0, 0, 0, 4)))
            console.print(Panel(Group(*entries), title=title, title_align="left", border_style="dim"))


def option_names(param: Any, ctx: Any) -> str:
    """An option's names as help shows them: ``--head [mlp|tr]``, ``--resume``, ``--a / --no-a``."""
    names = ", ".join(param.opts)
    if param.secondary_opts:
        return f"{names} / {', '.join(param.secondary_opts)}"
    if param.is_flag:
        return names
    return f"{names} {_value_name(param, ctx)}".rstrip()


def _value_name(param: Any, ctx: Any) -> str:
    """What an option's value is called in help (``<int>``, ``[mlp|tr]``), from Typer's own
    click or from click (whose ``make_metavar`` takes the context from click 8.2 on)."""
    if hasattr(param, "display_type_rich"):
        return str(param.display_type_rich(ctx) or "")
    if param.metavar:
        return str(param.metavar)
    try:
        return str(param.make_metavar(ctx))
    except TypeError:
        return str(param.make_metavar())


def option_help(param: Any, apart: bool = False) -> Any:
    """An option's help with its default, or (``apart``) the help and the default's text."""
    text, shown, default = param.help or "", param.show_default, None
    if isinstance(shown, str):
        default = shown
    elif param.is_flag and not param.secondary_opts:
        default = "off" if not param.default else "on"
    elif shown is not False and param.default is not None:
        default = str(param.default)
    if apart:
        return text, default
    return f"{text} (default: {default})" if default and not (param.is_flag and default == "off") else text


# The order a user meets the commands in: get a backbone, train, measure, use, share.
COMMAND_ORDER = ("info", "fetch", "prepare", "train", "eval", "report", "segment", "push", "export", "import", "demo")


class CauseGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_help(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        known = super().list_commands(ctx)
        return sorted(known, key=lambda name: COMMAND_ORDER.index(name) if name in COMMAND_ORDER else len(known))


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
        from ..progress import show_warnings_as_notes

        show_warnings_as_notes(stderr)


def _reporter(quiet: bool) -> Any:
    from ..progress import RichReporter

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


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line, not left at its default. (Typer
    may bring its own copy of click, so its sources are told apart by name.)"""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


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

    from ..devices import resolve_device
    from ..distributed import launch

    available = torch.cuda.device_count()
    if resolve_device(device).type == "cuda":
        if available < processes:
            raise CauseError(f"--gpus {processes} asks for more GPUs than this machine has ({available}).")
    elif device != "cpu":
        raise CauseError(
            f"--gpus {processes} needs GPUs and this machine has none; --device cpu runs CPU processes instead."
        )
    # The options given on this command line, passed on as they came; the others default alike
    # (and what a --config file says is read again by every process).
    arguments: list[str] = [ctx.info_name or "", *fixed]
    for option in ctx.command.params:
        if option.param_type_name != "option" or option.name in ("gpus", *passed_on_elsewhere, None):
            continue
        if not given_on_command_line(ctx, option.name):
            continue
        value = ctx.params[option.name]
        if value is None:
            continue
        if getattr(option, "is_flag", False):
            arguments += [option.opts[0]] if value else option.secondary_opts[:1]
        else:
            arguments += [option.opts[0], str(value)]
    status = launch(processes, arguments)
    if status != 0:
        raise CauseError(f"{what} in {processes} processes failed (exit status {status}); their messages are above.")
