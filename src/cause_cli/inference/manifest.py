"""What ``cause segment`` has finished in its output folder, so that a rerun goes on from there.

``OUT/segment.json`` records what the outputs were made with: the run (its folder and a hash
of its weights, its description and its cluster-to-class matching) and the settings that change
them. ``OUT/manifest.jsonl`` (with several processes, one part each: ``manifest.R-of-N.jsonl``) gets
one line per finished input, appended only after the input's
files are complete (each written to a temporary file, then renamed), and flushed to disk
batch by batch. A process killed at any moment leaves, at worst, a last line cut short and
outputs that no line names: both are redone by the next run, which skips every input a whole
line names. Another run or other settings in the same folder are refused, so outputs of two
models never mix; ``--overwrite`` removes the folder's earlier outputs first. Every file is
written through the folder's ledger (:mod:`cause_cli.owned`): a file cause did not write there,
or one changed since (a hand-corrected map), is never replaced or removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..backbones import file_sha256
from ..errors import CauseError
from ..owned import OwnedFolder, Writer, cut_torn_line
from ..paths import json_text
from ..run_checks import MAX_METRICS_JSON_BYTES, read_json

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
from ..runs import CLUSTERBOOK_FILE, HEAD_FILE, METRICS_FILE, PROBE_FILE, RUN_FILE, RunDirectory
from .inputs import pending_inputs
from .outputs import OUTPUT_KINDS, output_names

SETTINGS_FILE = "segment.json"
MANIFEST_FILE = "manifest.jsonl"
SUMMARY_FILE = "summary.json"
LEGEND_FILE = "legend.png"
ADVICE = "give another --out, or move the file away"
# The run's files whose bytes decide the label maps (metrics.json: the cluster-to-class matching).
_DECIDING_FILES = (RUN_FILE, CLUSTERBOOK_FILE, HEAD_FILE, PROBE_FILE)


def run_fingerprint(run: RunDirectory) -> str:
    """A SHA-256 over the run files that decide its label maps."""
    digest = hashlib.sha256()
    for name in _DECIDING_FILES:
        if run.has(name):
            digest.update(f"{name}\0{file_sha256(run.file(name))}\0".encode())
    if run.has(METRICS_FILE):
        metrics, _ = read_json(run.file(METRICS_FILE), MAX_METRICS_JSON_BYTES)
        matching = metrics.get("cluster_to_class") if isinstance(metrics, dict) else None
        digest.update(b"cluster_to_class\0" + json.dumps(matching).encode())
    return digest.hexdigest()


def manifest_name(rank: int, processes: int) -> str:
    """The manifest part process ``rank`` of ``processes`` appends to (one part each)."""
    return MANIFEST_FILE if processes == 1 else f"manifest.{rank}-of-{processes}.jsonl"


class OutputFolder:
    """The output folder of one segmentation, across the processes and reruns that fill it."""

    def __init__(self, path: Path, rank: int = 0, processes: int = 1) -> None:
        self.path = path
        # One manifest per process, each appended by its process alone.
        self.manifest_name = manifest_name(rank, processes)
        self.processes = processes
        self._manifest: IO[str] | None = None
        self.owned = OwnedFolder(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder while one segmentation fills it: a second one into the same folder is
        refused in one sentence (the kernel's lock on the folder itself: no file is made for it,
        and a process that ends in any way releases it)."""
        made_here = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDONLY) if fcntl is not None else None
        try:
            if descriptor is not None:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise CauseError(
                        f"{self.path} is being written by another cause segment; wait for it to end, or give "
                        "another --out."
                    ) from None
            yield
        except CauseError:
            if made_here and not any(self.path.iterdir()):  # refused before writing: no empty folder left
                self.path.rmdir()
            raise
        finally:
            if descriptor is not None:
                os.close(descriptor)

    def refuse_foreign(self, names: Iterable[str]) -> None:
        """Before anything is written: each of ``names`` is absent or a file cause wrote here."""
        self.owned.refuse_unless_ours(names, ADVICE)

    def own_files(self, legend: bool) -> list[str]:
        """The folder's own files a segmentation writes, beside the outputs of its inputs."""
        manifests = [manifest_name(rank, self.processes) for rank in range(self.processes)]
        pages = ["index.html", *sorted(path.name for path in self.path.glob("index-*.html"))]  # the gallery's
        return [SETTINGS_FILE, SUMMARY_FILE, *manifests, *pages, *([LEGEND_FILE] if legend else [])]

    def clear(self) -> list[str]:
        """Remove what earlier segmentations wrote here (files the ledger records, unchanged
        since) and nothing else; the sentences for files left in place."""
        self._manifest = None
        return self.owned.remove()

    def write_file(self, name: str, write: Writer) -> None:
        self.owned.write(name, write)

    def write_json(self, name: str, data: Any) -> None:
        self.write_file(name, lambda target: target.write_text(json_text(data, indent=2) + "\n"))

    def refuse_other_settings(self, settings: dict[str, Any]) -> None:
        """Refuse when the folder holds outputs made with another run or other settings."""
        recorded_path = self.path / SETTINGS_FILE
        if recorded_path.is_file():
            try:
                recorded = json.loads(recorded_path.read_text())
            except (ValueError, RecursionError):
                recorded = None
            if recorded != json.loads(json_text(settings)):
                differing = _differences(recorded, settings)
                raise CauseError(
                    f"{self.path} holds the outputs of another segmentation ({differing}); give another --out, "
                    "or --overwrite to replace them."
                )
            return
        if self.parts():
            raise CauseError(
                f"{self.path} holds a {MANIFEST_FILE} without its {SETTINGS_FILE}; give another --out, or "
                "--overwrite to replace what is there."
            )

    def claim(self, settings: dict[str, Any]) -> None:
        """Record ``settings`` for this folder, or refuse when it holds outputs made otherwise."""
        self.refuse_other_settings(settings)
        if not (self.path / SETTINGS_FILE).is_file():
            self.write_json(SETTINGS_FILE, settings)

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("manifest*.jsonl"))

    def finished(self, path: Path | None = None) -> Iterator[dict[str, Any]]:
        """Every whole line of this process's manifest (or ``path``), in the order written (a
        line cut short is left out), read as it streams by; lines appended since are not."""
        path = path or self.path / self.manifest_name
        if not path.is_file():
            return
        end = path.stat().st_size
        with path.open("rb") as lines:
            for raw in lines:
                if lines.tell() > end or not raw.endswith(b"\n"):
                    break  # appended since, or cut short by a kill
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                    yield entry

    def record(self, entries: list[dict[str, Any]]) -> None:
        """Append finished inputs (their files already complete) and put them on disk."""
        if not entries:
            return
        if self._manifest is None:
            path = self.path / self.manifest_name
            self.owned.record_appended(self.manifest_name)
            self._manifest = path.open("a+", encoding="utf-8")
            cut_torn_line(self._manifest.fileno())
        self._manifest.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
        self._manifest.flush()
        os.fsync(self._manifest.fileno())

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None


def refuse_outputs_among_inputs(source: Path | str, out: Path) -> None:
    """One sentence when the outputs would land among the inputs, where every rerun would take
    the earlier outputs for new inputs (``labels/labels/...``)."""
    inputs = Path(source)
    if not inputs.is_dir():
        return
    inputs, outputs = inputs.resolve(), out.resolve()
    if inputs == outputs:
        raise CauseError(
            f"--out {out} is the folder of the inputs, so the outputs would become inputs; give another folder "
            f"(for example --out {out / 'segments'})."
        )
    for name in OUTPUT_KINDS:
        if inputs.is_relative_to(outputs / name):
            raise CauseError(
                f"The inputs lie in {out / name}, where cause segment writes its outputs; give another --out."
            )


def check_before_writing(
    folder: OutputFolder,
    source: Path | str,
    settings: dict[str, Any],
    save: tuple[str, ...],
    legend: bool,
    overwrite: bool,
) -> None:
    """Everything that could refuse the segmentation, before its first write: the folder's
    settings, and every file it would write over (the folder's own and each pending input's)
    must be absent or written by cause there and unchanged since."""
    if not overwrite:
        folder.refuse_other_settings(settings)
    folder.refuse_foreign(folder.own_files(legend))
    finished = iter(()) if overwrite else (entry["input"] for part in folder.parts() for entry in folder.finished(part))
    pending, _, _ = pending_inputs(source, folder.path, finished)
    folder.refuse_foreign(name for entry in pending if entry.problem is None for name in output_names(entry, save))


def _differences(recorded: Any, settings: dict[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return f"its {SETTINGS_FILE} is damaged"
    changed = []
    for key, value in json.loads(json_text(settings)).items():
        if recorded.get(key) == value:
            continue
        if key == "run_sha256":
            changed.append("the run's weights or cluster-to-class matching differ")
        elif key == "processes":
            changed.append(
                f"it was shared among {recorded.get(key)} processes, here {value}: give --gpus {recorded.get(key)}"
            )
        else:
            changed.append(f"{key} {recorded.get(key)!r} there, {value!r} here")
    return "; ".join(changed) or "other settings"
