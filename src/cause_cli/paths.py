"""Where the toolkit keeps things, and how it writes files without leaving half of one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CauseError

CACHE_ENV = "CAUSE_HOME"


def cache_home() -> Path:
    """The toolkit's cache folder: ``$CAUSE_HOME``, else ``~/.cache/cause``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "cause"


@dataclass
class FolderListing:
    """The files below a folder, and what could not be looked at, each with the reason."""

    files: list[Path] = field(default_factory=list)
    unreachable: list[tuple[Path, str]] = field(default_factory=list)


def dangling_link(path: Path) -> str:
    """Why a symbolic link whose target does not exist is skipped."""
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


def walk_folders(
    root: Path, skip_hidden: bool = False, leave_out: Path | None = None
) -> Iterator[tuple[list[Path], list[tuple[Path, str]]]]:
    """One folder below ``root`` at a time, sub-folders in sorted order: its files, sorted
    (symbolic links to files included; links to folders are not followed), and what could not
    be looked at, each with the reason: dangling links, and folders that could not be read.
    Nothing is kept from one folder to the next. ``leave_out``: a folder not to go into."""
    left_out = leave_out.resolve() if leave_out is not None else None
    problems: list[tuple[Path, str]] = []

    def could_not_read(error: OSError) -> None:
        problems.append((Path(error.filename), f"the folder could not be read ({error.strerror})"))

    for folder, subfolders, names in os.walk(root, onerror=could_not_read):
        here = Path(folder)
        subfolders[:] = sorted(
            name
            for name in subfolders
            if not (skip_hidden and name.startswith(".")) and (left_out is None or (here / name).resolve() != left_out)
        )
        files, unreachable = [], problems[:]
        problems.clear()
        for name in sorted(names):
            path = here / name
            if skip_hidden and name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                unreachable.append((path, dangling_link(path)))
        yield files, unreachable
    if problems:  # the last folders, or ``root`` itself
        yield [], problems


def list_files(root: Path, skip_hidden: bool = False) -> FolderListing:
    """Every file below ``root`` in sorted order, and what could not be looked at (see
    :func:`walk_folders`), rather than passed over in silence."""
    listing = FolderListing()
    for files, unreachable in walk_folders(root, skip_hidden):
        listing.files += files
        listing.unreachable += unreachable
    listing.files.sort()
    listing.unreachable.sort()
    return listing


def runs_home() -> Path:
    """Default parent of run folders: ``./runs``."""
    return Path("runs")


def next_numbered_folder(parent: Path, stem: str) -> Path:
    """``parent/stem``, else ``parent/stem2``, ``parent/stem3``... whichever does not exist."""
    candidate = parent / stem
    number = 2
    while candidate.exists():
        candidate = parent / f"{stem}{number}"
        number += 1
    return candidate


def refuse_unusable_folder(path: Path, option: str) -> None:
    """One sentence when ``path`` cannot be a folder the toolkit writes into: a file, a
    symbolic link (what it writes would land elsewhere), or a path below a file."""
    if path.is_symlink():
        raise CauseError(f"{option} {path} is a symbolic link; give the folder it points to, or another folder.")
    if path.exists() and not path.is_dir():
        raise CauseError(f"{option} {path} is a file, not a folder; give a folder.")
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise CauseError(f"{option} {path} lies below {above}, which is a file; give a folder.")
            return


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import, while nothing else runs: os.umask can only be read by setting it.
UMASK = _process_umask()


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary_path)`` then rename the result onto ``path``.

    A crash or interruption leaves either the old file or the new one, never a partial one.
    The file gets the permissions any new file gets (``0644`` under the usual umask), not
    the temporary file's ``0600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        os.chmod(temporary_path, 0o666 & ~UMASK)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def json_ready(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None: JSON has neither, and a
    reader of a bare ``NaN`` fails (a class without pixels has no IoU)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_ready(value) for value in data]
    return data


def json_text(data: Any, indent: int | None = None) -> str:
    return json.dumps(json_ready(data), indent=indent, allow_nan=False)


def write_json(path: Path, data: Any) -> None:
    write_atomically(path, lambda target: target.write_text(json_text(data, indent=2) + "\n"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def readable_size(size: int) -> str:
    """``size`` bytes in GiB, or MiB below one GiB (never "0.0 GiB")."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
