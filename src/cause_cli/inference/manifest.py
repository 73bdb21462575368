"""What ``cause segment`` has finished in its output folder, so that a rerun goes on from there.

``OUT/segment.json`` records what the outputs were made with: the run (its folder and a hash
of its weights, its description and its cluster-to-class matching) and the settings that change
them. ``OUT/manifest.jsonl`` (with several processes, one part each: ``manifest.R-of-N.jsonl``) gets
one line per finished input, appended only after the input's
files are complete (each written to a temporary file, then renamed), and flushed to disk
batch by batch. A process killed at any moment leaves, at worst, a last line cut short and
outputs that no line names: both are redone by the next run, which skips every input a whole
line names. Another run or other settings in the same folder are refused, so outputs of two
models never mix; ``--overwrite`` clears the folder's earlier outputs first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..backbones import file_sha256
from ..errors import CauseError
from ..paths import json_text, write_json
from ..runs import CLUSTERBOOK_FILE, HEAD_FILE, METRICS_FILE, PROBE_FILE, RUN_FILE, RunDirectory

SETTINGS_FILE = "segment.json"
MANIFEST_FILE = "manifest.jsonl"
SUMMARY_FILE = "summary.json"
OUTPUT_FOLDERS = ("labels", "overlays", "scores")
# The run's files whose bytes decide the label maps (metrics.json: the cluster-to-class matching).
_DECIDING_FILES = (RUN_FILE, CLUSTERBOOK_FILE, HEAD_FILE, PROBE_FILE)


def run_fingerprint(run: RunDirectory) -> str:
    """A SHA-256 over the run files that decide its label maps."""
    digest = hashlib.sha256()
    for name in _DECIDING_FILES:
        if run.has(name):
            digest.update(f"{name}\0{file_sha256(run.file(name))}\0".encode())
    if run.has(METRICS_FILE):
        try:
            matching = json.loads(run.file(METRICS_FILE).read_text()).get("cluster_to_class")
        except (ValueError, AttributeError):
            matching = None
        digest.update(b"cluster_to_class\0" + json.dumps(matching).encode())
    return digest.hexdigest()


class OutputFolder:
    """The output folder of one segmentation, across the processes and reruns that fill it."""

    def __init__(self, path: Path, rank: int = 0, processes: int = 1) -> None:
        self.path = path
        # One manifest per process, each appended by its process alone.
        self.manifest_name = MANIFEST_FILE if processes == 1 else f"manifest.{rank}-of-{processes}.jsonl"
        self._manifest: IO[str] | None = None

    def clear(self) -> None:
        """Remove what earlier segmentations wrote here (and nothing else)."""
        for name in OUTPUT_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (SETTINGS_FILE, SUMMARY_FILE, "legend.png"):
            (self.path / name).unlink(missing_ok=True)
        for part in self.path.glob("manifest*.jsonl"):
            part.unlink()

    def claim(self, settings: dict[str, Any]) -> None:
        """Record ``settings`` for this folder, or refuse when it holds outputs made otherwise."""
        recorded_path = self.path / SETTINGS_FILE
        if recorded_path.is_file():
            try:
                recorded = json.loads(recorded_path.read_text())
            except ValueError:
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
        write_json(recorded_path, settings)

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
            self.path.mkdir(parents=True, exist_ok=True)
            _cut_torn_line(path)
            self._manifest = path.open("a", encoding="utf-8")
        self._manifest.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
        self._manifest.flush()
        os.fsync(self._manifest.fileno())

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None


def _cut_torn_line(path: Path) -> None:
    """Drop a last line a killed process left unfinished, so the next line starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)


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
