"""The run directory: one readable folder holding everything a training run made.

::

    run.json                  what the run is: the resolved configuration, the backbone and
                              its file hash, the number of classes and their names
    clusterbook.safetensors   step one: the concept clusterbook ``[K, D]``
    head.safetensors          step two: student and teacher heads, projection heads,
                              linear probe
    probe.safetensors         step three: cluster probe ``[C, r]`` (and the linear probe)
    metrics.json              written by ``cause eval``
    history.csv               the learnt steps' losses as training went (a row every stride)
    curves.png                drawn from history.csv at the end of training
    train.log                 one line per event
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from . import run_checks
from .config import TrainConfig
from .errors import CauseError
from .owned import LEDGER_FILE, OwnedFolder, Writer
from .paths import json_text

CLUSTERBOOK_FILE = "clusterbook.safetensors"
HEAD_FILE = "head.safetensors"
FRONT_DOOR_HEAD_FILE = "head_front_door.safetensors"  # step two's head, kept by the reference recipe
PROBE_FILE = "probe.safetensors"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
RESUME_FILE = "resume.pt"  # the unfinished step's training state; gone once the step is done
LOG_FILE = "train.log"
LOCK_FILE = ".lock"  # held (flock) by the process writing the folder; says who that is
# What a training writes, and what its evaluation adds: `cause train --overwrite` removes them
# where the run's ledger records them as the toolkit's (the log and the feature cache, whose
# folder names the backbone and images it holds, are kept).
HISTORY_FILE = "history.csv"  # the losses as training went (training/history.py)
CURVES_FILE = "curves.png"
TRAINED_FILES = (
    RUN_FILE,
    CLUSTERBOOK_FILE,
    HEAD_FILE,
    FRONT_DOOR_HEAD_FILE,
    PROBE_FILE,
    RESUME_FILE,
    HISTORY_FILE,
    CURVES_FILE,
)
REPORT_FILE = "report.html"  # written by cause eval and cause report (inference/report.py)
EVALUATION_FILES = (METRICS_FILE, "confusion.png", "samples.png", REPORT_FILE)
TRAINING_OUTPUTS = (*TRAINED_FILES, *EVALUATION_FILES)


def _run_info_problem(info: Any) -> str | None:
    """What makes ``info`` (a parsed run.json) unusable, in a few words; None if nothing
    (every field checked by type and range: run_checks.py)."""
    return run_checks.run_info_problem(info)


@dataclass
class RunDirectory:
    path: Path
    # False in every training process but rank 0: they read the run folder, rank 0 writes it.
    writes: bool = True
    # "hf-hub:OWNER/NAME[@REVISION]" for a run downloaded from the Hub (its folder is the cache's).
    hub_id: str | None = None
    _owned: OwnedFolder | None = field(default=None, init=False, repr=False, compare=False)

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    @contextlib.contextmanager
    def writing(self, command: str) -> Iterator[None]:
        """Hold the folder's lock while ``command`` writes it; another process that holds it is
        named in one sentence. The lock is the kernel's (``flock``), so a process that ends in
        any way, ``kill -9`` included, releases it: it cannot be left stuck."""
        if not self.writes or fcntl is None:  # only the writing process locks; no flock on Windows
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = self.file(LOCK_FILE).open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise CauseError(
                    f"{self.path} is being written by {holder}; wait for it to end, or use another folder."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"cause {command} (process {os.getpid()} on {socket.gethostname()})")
            handle.flush()
            # Temporary files are only ever written under this lock: any there now were left by
            # a process that was killed while writing.
            stale = list(self.path.glob(".*.tmp"))
            for leftover in stale:
                leftover.unlink(missing_ok=True)
            if stale:
                self.log(f"removed {len(stale)} temporary file(s) left by an interrupted write")
            yield
        finally:
            handle.close()  # closing releases the lock

    @property
    def owned(self) -> OwnedFolder:
        if self._owned is None:
            self._owned = OwnedFolder(self.path)
        return self._owned

    def refuse_foreign_files(self, overwrite: bool) -> None:
        """Before training writes anything: every file training may replace here (and, with
        ``overwrite``, every file it would remove) must be one the toolkit wrote."""
        names = TRAINING_OUTPUTS if overwrite else TRAINED_FILES
        self.owned.refuse_unless_ours(
            names, "move it away, or give another --run (cause trains only into folders it made)"
        )

    def clear_training(self) -> list[str]:
        """Remove what training and evaluation wrote here (the files the run's ledger records,
        unchanged since), so the folder can be trained over; the sentences for files left."""
        left = self.owned.remove(TRAINING_OUTPUTS)
        self.log("overwritten: the earlier training's files were removed")
        for problem in left:
            self.log(f"left in place: {problem}")
        return left

    def remove_if_bookkeeping_only(self) -> None:
        """Remove the folder when it holds nothing but the lock, the log and the ledger: what a
        training refused before its first result leaves in a folder it made."""
        bookkeeping = {LOCK_FILE, LOG_FILE, LEDGER_FILE}
        if not self.path.is_dir() or not {entry.name for entry in self.path.iterdir()} <= bookkeeping:
            return
        for name in bookkeeping:
            self.file(name).unlink(missing_ok=True)
        self.path.rmdir()

    def write_file(self, name: str, write: Writer) -> None:
        """The file ``name`` of the run, made by ``write(temporary_path)``, recorded as the run's own."""
        if self.writes:
            self.owned.write(name, write)

    def write_json(self, name: str, data: Any) -> None:
        self.write_file(name, lambda target: target.write_text(json_text(data, indent=2) + "\n"))

    def remove_file(self, name: str) -> None:
        """Remove the run's own file ``name`` (a file the toolkit did not write is left)."""
        if self.writes:
            self.owned.remove([name])

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """The weight file ``name``: ``tensors``, and ``metadata`` in its header (what its
        format is, where the file says: cause_cli/trained.py)."""
        from safetensors.torch import save_file

        if not self.writes:
            return
        contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        self.write_file(name, lambda target: save_file(contiguous, str(target), metadata=metadata))

    def load_tensors(self, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.file(name)
        if not path.is_file():
            raise CauseError(f"Run {self.path} has no {name}; train it first with 'cause train --run {self.path}'.")
        try:
            tensors = load_file(str(path), device=str(device))
        except (KeyboardInterrupt, SystemExit):
            raise
        # safetensors raises its own error types for damaged files, and a header it cannot
        # follow can end in a Rust panic, which Python sees as a BaseException.
        except BaseException as error:
            raise CauseError(f"{path} is damaged or not a safetensors file; {run_checks.RUN_REMEDY}.") from error
        run_checks.check_weights(path, tensors)  # floating-point and finite, every tensor
        return tensors

    def tensor_metadata(self, name: str) -> dict[str, str]:
        """The metadata in the header of the weight file ``name``, empty where it has none (read
        after :meth:`load_tensors`, which says what is wrong with a damaged file)."""
        from safetensors import safe_open

        path = self.file(name)
        try:
            with safe_open(str(path), framework="pt") as opened:
                return dict(opened.metadata() or {})
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # as in load_tensors
            raise CauseError(f"{path} is damaged or not a safetensors file; {run_checks.RUN_REMEDY}.") from error

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Training state (tensors, numbers, nested dicts) that only this toolkit reads back."""
        if not self.writes:
            return
        self.write_file(name, lambda target: torch.save(state, target))

    def load_state(self, name: str) -> dict[str, Any]:
        try:
            return torch.load(self.file(name), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for damaged or foreign files
            raise CauseError(f"{self.file(name)} is damaged; delete it to start the step over.") from error

    def write_run_info(self, info: dict[str, Any]) -> None:
        self.write_json(RUN_FILE, info)

    def read_run_info(self) -> dict[str, Any]:
        path = self.file(RUN_FILE)
        if not path.is_file():
            raise CauseError(f"{self.path} is not a run folder (it has no {RUN_FILE}).")
        info, damage = run_checks.read_json(path, run_checks.MAX_RUN_JSON_BYTES)
        if damage:
            raise CauseError(f"{path} is damaged: {damage}; {run_checks.RUN_REMEDY}.")
        problem = _run_info_problem(info)
        if problem:
            raise CauseError(f"{path} is not a run description this toolkit wrote: {problem}; {run_checks.RUN_REMEDY}.")
        return info

    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.read_run_info()["config"])

    def log(self, message: str) -> None:
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with self.file(LOG_FILE).open("a") as handle:
            handle.write(f"{stamp} {message}\n")


HUB_RUN_PREFIX = "hf-hub:"
WEIGHT_FILES = (CLUSTERBOOK_FILE, HEAD_FILE, PROBE_FILE)
HUB_RUN_FILES = (RUN_FILE, *WEIGHT_FILES)  # what a run needs; metrics.json if there
WEIGHTS_SHA256 = "weights_sha256"  # in the run.json that cause push uploads: file -> SHA-256


def hub_run(spec: str) -> RunDirectory:
    """The run ``hf-hub:OWNER/NAME[@REVISION]``: the files a run needs, downloaded once into the
    Hub's cache (each checked against the Hub's checksum) and read from there afterwards, offline
    too. Its folder is the cache's snapshot of that revision, read-only."""
    from .backbones import file_sha256, hub

    repo, _, revision = spec[len(HUB_RUN_PREFIX) :].partition("@")
    if not hub.is_repo_id(repo):
        raise CauseError(f"'{spec}' is not a run on the Hub; write hf-hub:OWNER/NAME or hf-hub:OWNER/NAME@REVISION.")
    what = f"run '{spec}'"
    files = [hub.download(repo, [name], revision or None, what=what) for name in HUB_RUN_FILES]
    metrics = hub.download_if_present(repo, [METRICS_FILE], revision or None, what=what)
    folders = {found.path.parent for found in [*files, *([metrics] if metrics else [])]}
    if len(folders) != 1:  # the branch moved between two downloads
        raise CauseError(f"The files of {spec} changed while they were downloaded; run the command again.")
    run = RunDirectory(folders.pop(), writes=False, hub_id=spec)
    recorded = run.read_run_info().get(WEIGHTS_SHA256) or {}
    for name, expected in recorded.items():
        if name in WEIGHT_FILES and file_sha256(run.file(name)) != expected:
            raise CauseError(
                f"{name} of {spec} is not the file its run.json describes (SHA-256 differs); the repository "
                "holds files of two runs: push the run again."
            )
    return run


def open_run(path: Path | str) -> RunDirectory:
    """An existing run folder (or ``hf-hub:OWNER/NAME[@REVISION]``), or one clear sentence why
    it is not one."""
    if str(path).startswith(HUB_RUN_PREFIX):
        return hub_run(str(path))  # its run.json read and checked there
    run = RunDirectory(Path(path))
    if not run.path.is_dir():
        raise CauseError(f"Run folder {run.path} does not exist.")
    run.read_run_info()
    return run
