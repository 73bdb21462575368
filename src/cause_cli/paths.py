"""Where the toolkit keeps things, and how it writes files without leaving half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def list_files(root: Path, skip_hidden: bool = False) -> FolderListing:
    """Every file below ``root`` in sorted order, symbolic links to files included (links to
    folders are not followed). Folders that cannot be read and links whose target does not
    exist are returned as unreachable rather than passed over in silence."""
    listing = FolderListing()

    def could_not_read(error: OSError) -> None:
        listing.unreachable.append((Path(error.filename), f"the folder could not be read ({error.strerror})"))

    for folder, subfolders, names in os.walk(root, onerror=could_not_read):
        if skip_hidden:
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            names = [name for name in names if not name.startswith(".")]
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                listing.files.append(path)
            elif path.is_symlink() and not path.exists():
                listing.unreachable.append((path, f"a symbolic link to {os.readlink(path)}, which does not exist"))
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


def readable_size(size: int) -> str:
    """``size`` bytes in GiB, or MiB below one GiB (never "0.0 GiB")."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
