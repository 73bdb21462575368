"""Files have owners: the toolkit replaces or removes only the files it recorded as its own.

Every folder the toolkit writes into (a run, the output folder of ``cause segment``) holds a
ledger, ``.cause-files.jsonl``: one line for each file written there, with the SHA-256 of the
bytes written. The line is appended and put on disk *before* the file is renamed into place,
so a kill at any moment leaves, at worst, a line for a file that never appeared: every file
the toolkit put in a folder is in its ledger. A file may be replaced or removed only when its
bytes are bytes the toolkit wrote under that name; anything else (a dataset's ground truth, a
hand-corrected label map, a user's notes that share a name with an output) is refused in one
sentence that names it. Logs the toolkit appends to (a manifest) are recorded as such: their
bytes change as they grow, their name alone is the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .errors import CauseError
from .paths import UMASK, file_sha256, write_atomically

LEDGER_FILE = ".cause-files.jsonl"
APPENDED = "appended"  # in place of a hash: a log the toolkit appends to

Writer = Callable[[Path], object]


def _read_ledger(path: Path) -> dict[str, set[str]]:
    """Each recorded file's name and every hash recorded for it (a line cut short by a kill, or
    one that is not a record, is passed over: it can only make fewer files the toolkit's)."""
    records: dict[str, set[str]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records
    except OSError as error:
        raise CauseError(f"{path} could not be read ({error.strerror}).") from error
    for raw in data.split(b"\n"):
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if not isinstance(entry, dict):
            continue
        name, digest = entry.get("file"), entry.get("sha256")
        if isinstance(name, str) and isinstance(digest, str):
            records.setdefault(name, set()).add(digest)
    return records


def _ledger_lines(records: Iterable[tuple[str, str]]) -> bytes:
    return "".join(json.dumps({"file": name, "sha256": digest}) + "\n" for name, digest in records).encode()


class OwnedFolder:
    """One folder the toolkit writes into, and the ledger of the files it wrote there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, set[str]] | None = None

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER_FILE

    def records(self) -> dict[str, set[str]]:
        if self._records is None:
            self._records = _read_ledger(self.ledger)
        return self._records

    def is_recorded(self, name: str) -> bool:
        return name in self.records()

    def why_not_ours(self, name: str) -> str | None:
        """Why the file ``name`` (a POSIX path below the folder) may not be replaced or removed,
        in a few words that start with its path; None when it may: it does not exist, or its
        bytes are bytes the toolkit wrote under that name."""
        path = self.path / name
        below = self.path
        parts = Path(name).parts
        for depth, part in enumerate(parts, start=1):
            below = below / part
            if below.is_symlink():
                return f"{below} is a symbolic link"
            if depth < len(parts) and below.exists() and not below.is_dir():
                return f"{below} is a file where cause writes a folder"
        if not path.exists():
            return None
        if not path.is_file():
            return f"{path} is not a file"
        hashes = self.records().get(name)
        if hashes is None:
            return f"{path} was not written by cause (it is not in {self.ledger.name}, the folder's record)"
        if APPENDED in hashes or file_sha256(path) in hashes:
            return None
        return f"{path} was changed since cause wrote it"

    def refuse_unless_ours(self, names: Iterable[str], advice: str) -> None:
        """One sentence for the first of ``names`` that may not be replaced, ending in ``advice``."""
        for name in names:
            problem = self.why_not_ours(name)
            if problem:
                raise CauseError(f"{problem}; cause replaces only files it wrote: {advice}.")

    def write(self, name: str, write: Writer) -> None:
        with self.batch() as batch:
            batch.write(name, write)

    @contextlib.contextmanager
    def batch(self) -> Iterator[WriteBatch]:
        """Files written together: each is made at once in a temporary file (so what it was
        made from can go), and when the block ends all are recorded in one append to the
        ledger, put on disk, then renamed into place. An error leaves none of them."""
        batch = WriteBatch(self)
        try:
            yield batch
        except BaseException:
            batch.discard()
            raise
        self.commit([batch])

    def commit(self, batches: list[WriteBatch]) -> None:
        """Put the files of ``batches`` (made, perhaps in other threads) in place: recorded in
        one append to the ledger, put on disk, then renamed. An error leaves none of them."""
        made = [file for batch in batches for file in batch.made]
        try:
            self._append([(file.name, file.sha256) for file in made])
            for file in made:
                os.replace(file.temporary, file.target)
        except BaseException:
            for batch in batches:
                batch.discard()
            raise

    def record_appended(self, name: str) -> None:
        """Record ``name`` as a log the toolkit appends to, before it is first created."""
        if APPENDED not in self.records().get(name, set()):
            problem = self.why_not_ours(name)
            if problem:
                raise CauseError(f"{problem}; cause replaces only files it wrote, and this one was left as it was.")
            self._append([(name, APPENDED)])

    def _append(self, records: list[tuple[str, str]]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        # One write of whole lines to a file opened for appending: processes writing one folder
        # together (segment --gpus N) never interleave within a line.
        if self.ledger.is_symlink():
            raise CauseError(f"{self.ledger} is a symbolic link; cause keeps its record of a folder's files in a file.")
        append_whole_lines(self.ledger, _ledger_lines(records))
        for name, digest in records:
            self.records().setdefault(name, set()).add(digest)

    def remove(self, names: Iterable[str] | None = None) -> list[str]:
        """Remove the recorded files (or those of ``names`` that are recorded) whose bytes are
        still bytes the toolkit wrote, and the folders that leaves empty; the sentence for each
        file left in place (changed since, or now a link), which the caller names to the user."""
        records = self.records()
        wanted = sorted(records) if names is None else sorted(set(names) & set(records))
        left, gone = [], set()
        for name in wanted:
            path = self.path / name
            problem = self.why_not_ours(name)
            if problem:
                if path.exists() or path.is_symlink():
                    left.append(problem)
                    continue
            elif path.exists():
                path.unlink()
                self._remove_empty_folders(path.parent)
            gone.add(name)
        if gone:
            kept = [(name, digest) for name in records if name not in gone for digest in sorted(records[name])]
            write_atomically(self.ledger, partial(write_synced, _ledger_lines(kept)))
            self._records = {name: digests for name, digests in records.items() if name not in gone}
        return left

    def _remove_empty_folders(self, folder: Path) -> None:
        while folder != self.path and folder.is_relative_to(self.path):
            try:
                folder.rmdir()
            except OSError:  # not empty (or not ours to remove): the folders above it are not either
                return
            folder = folder.parent


@dataclass(frozen=True)
class MadeFile:
    """A file made in its temporary file, not yet in place, with the hash of its bytes."""

    temporary: Path
    target: Path
    name: str
    sha256: str


class WriteBatch:
    """The files of one :meth:`OwnedFolder.batch`, made but not yet in place. A batch may be
    made in another thread than the one that commits it."""

    def __init__(self, folder: OwnedFolder) -> None:
        self.folder = folder
        self.made: list[MadeFile] = []

    def write(self, name: str, write: Writer) -> None:
        problem = self.folder.why_not_ours(name)
        if problem:
            raise CauseError(f"{problem}; cause replaces only files it wrote, and this one was left as it was.")
        target = self.folder.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(handle)
        try:
            write(Path(temporary))
            os.chmod(temporary, 0o666 & ~UMASK)
            # Hashed here, while its bytes are in the cache and in the thread that made them.
            self.made.append(MadeFile(Path(temporary), target, name, file_sha256(Path(temporary))))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        for file in self.made:
            file.temporary.unlink(missing_ok=True)
        self.made = []


def append_whole_lines(path: Path, lines: bytes, header: bytes = b"") -> None:
    """Append ``lines`` (whole lines) to ``path`` in one write and put them on disk, after
    cutting a last line a kill left unfinished; ``header`` first when the file is empty."""
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        cut_torn_line(descriptor)
        os.write(descriptor, (header if os.fstat(descriptor).st_size == 0 else b"") + lines)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def cut_torn_line(descriptor: int) -> None:
    """Drop a last line a killed process left unfinished, so the next record starts clean."""
    size = os.fstat(descriptor).st_size
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return
    data = os.pread(descriptor, size, 0)
    os.ftruncate(descriptor, data.rfind(b"\n") + 1)


def write_synced(data: bytes, target: Path) -> None:
    with target.open("wb") as output:
        output.write(data)
        output.flush()
        os.fsync(output.fileno())
