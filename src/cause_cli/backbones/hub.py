"""Downloading files from the Hugging Face Hub, verified, with one sentence for every failure.

Downloads go through ``huggingface_hub`` and its cache, so ``HF_TOKEN`` (or ``hf auth
login``), ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` work as
usual. ``huggingface_hub`` reads those variables once, when it is imported; this module reads
them again for every download, so they take effect even when set later in the same process.

Failures the user can do something about end as a :class:`CauseError`: a gated or private
repository, a missing repository, revision or file, no network, offline mode. Offline mode
and an unreachable Hub fail at once: one metadata request without retries is made before
the download, instead of ``huggingface_hub``'s retries of about half a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CauseError
from ..progress import Reporter

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT = 10.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
# Exceptions that mean "no connection", by class name: huggingface_hub has used requests,
# httpx and httpx2 over its versions, and this module should not depend on which.
_NETWORK_ERROR_NAMES = {
    "ConnectError",
    "ConnectTimeout",
    "ConnectionError",
    "NetworkError",
    "ProxyError",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "OfflineModeIsEnabled",
}


_REPO_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"


def is_repo_id(repo: str) -> bool:
    """Whether ``repo`` has the form of a Hub repository id, ``OWNER/NAME`` (no ``..``)."""
    return re.fullmatch(f"{_REPO_PART}/{_REPO_PART}", repo) is not None and ".." not in repo


@dataclass(frozen=True)
class HubSettings:
    """The Hub settings in force now, read from the environment."""

    endpoint: str
    cache_dir: Path
    offline: bool
    timeout: float


def hub_settings() -> HubSettings:
    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    offline = bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache is None and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    cache_dir = Path(cache).expanduser() if cache else Path(constants.HF_HUB_CACHE)
    try:
        timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        timeout = DEFAULT_TIMEOUT
    return HubSettings(endpoint, cache_dir, offline, timeout)


@dataclass(frozen=True)
class HubFile:
    """A file from the Hub, in huggingface_hub's cache, checked against the Hub's checksum."""

    path: Path
    repo: str
    filename: str
    revision: str
    commit: str | None
    checksum: str | None  # the Hub's ETag: SHA-256 for LFS files, git SHA-1 for small ones

    def record(self) -> dict[str, Any]:
        return {
            "hub_repo": self.repo,
            "hub_file": self.filename,
            "revision": self.revision,
            "commit": self.commit,
            "hub_checksum": self.checksum,
        }


def download(
    repo: str,
    filenames: Sequence[str],
    revision: str | None = None,
    *,
    what: str,
    force: bool = False,
    reporter: Reporter | None = None,
) -> HubFile:
    """The first of ``filenames`` that ``repo`` has, downloaded (or found in the cache).

    ``what`` names the thing for messages, e.g. ``backbone 'dino-vits8'``.
    """
    found = _download(repo, filenames, revision, what, force, reporter, required=True)
    if found is None:
        names = " or ".join(filenames)
        raise CauseError(f"The Hub repository {repo} (revision {revision or 'main'}) has no {names}.")
    return found


def download_if_present(repo: str, filenames: Sequence[str], revision: str | None, *, what: str) -> HubFile | None:
    """Like :func:`download`, but None when the repository has none of ``filenames`` (offline:
    when none is cached)."""
    return _download(repo, filenames, revision, what, False, None, required=False)


def _download(
    repo: str,
    filenames: Sequence[str],
    revision: str | None,
    what: str,
    force: bool,
    reporter: Reporter | None,
    required: bool,
) -> HubFile | None:
    settings = hub_settings()
    revision_name = revision or "main"
    if settings.offline:
        cached = _from_cache(repo, filenames, revision, settings)
        if cached is None and required:
            raise CauseError(
                f"{what[:1].upper()}{what[1:]} is not cached and HF_HUB_OFFLINE is set, so nothing is downloaded; "
                "fetch it where there is a network."
            )
        return cached

    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for filename in filenames:
        url = hf_hub_url(repo, filename, revision=revision_name, endpoint=settings.endpoint)
        try:
            # One request, no retries: an unreachable Hub or a missing file is known at once.
            get_hf_file_metadata(url, timeout=settings.timeout)
        except Exception as error:
            if _is_missing_file(error):
                continue
            if _is_network_error(error):
                cached = _from_cache(repo, filenames, revision, settings)
                if cached is not None:
                    return cached
            raise _explain(error, repo, revision_name, settings, what) from error
        try:
            path = Path(_hf_hub_download(repo, filename, revision, settings, force, reporter or Reporter(), what))
        except CauseError:
            raise
        except Exception as error:
            raise _explain(error, repo, revision_name, settings, what) from error
        return _verified(path, repo, filename, revision_name)
    return None


def _hf_hub_download(
    repo: str,
    filename: str,
    revision: str | None,
    settings: HubSettings,
    force: bool,
    reporter: Reporter,
    what: str,
) -> str:
    from huggingface_hub import hf_hub_download

    def progress_bar(**kwargs: Any) -> _ReporterBar:
        return _ReporterBar(reporter, f"{what}: {filename}", kwargs.get("total"), kwargs.get("initial") or 0)

    return hf_hub_download(  # type: ignore[call-overload,no-any-return]
        repo,
        filename,
        revision=revision,
        cache_dir=str(settings.cache_dir),
        endpoint=settings.endpoint,
        force_download=force,
        etag_timeout=settings.timeout,
        tqdm_class=progress_bar,
    )


class _ReporterBar:
    """The part of tqdm that huggingface_hub uses, drawn by a :class:`Reporter`."""

    def __init__(self, reporter: Reporter, description: str, total: int | None, initial: int) -> None:
        self._stack = contextlib.ExitStack()
        self._advance = self._stack.enter_context(reporter.download(description, total))
        if initial:
            self._advance(initial)

    def update(self, count: int | float = 1) -> None:
        self._advance(int(count))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> _ReporterBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _from_cache(repo: str, filenames: Sequence[str], revision: str | None, settings: HubSettings) -> HubFile | None:
    """The first of ``filenames`` already in huggingface_hub's cache for ``revision``, verified."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(repo, filename, cache_dir=str(settings.cache_dir), revision=revision)
        if isinstance(cached, str):
            return _verified(Path(cached), repo, filename, revision or "main")
    return None


def _verified(path: Path, repo: str, filename: str, revision: str) -> HubFile:
    """Check the file against the checksum its cache entry is named by (the Hub's ETag)."""
    blob = path.resolve()
    checksum = blob.name if _SHA256.fullmatch(blob.name) or _GIT_SHA1.fullmatch(blob.name) else None
    if checksum is not None and _checksum(blob, len(checksum) == 40) != checksum:
        # A damaged blob would be served again by the cache: remove it so the next try downloads.
        blob.unlink(missing_ok=True)
        if path != blob:
            path.unlink(missing_ok=True)
        raise CauseError(
            f"The file {filename} downloaded from {repo} does not match the Hub's checksum and was deleted; "
            "run the command again to download it anew."
        )
    commit = path.parent.name if _GIT_SHA1.fullmatch(path.parent.name) else None
    return HubFile(path, repo, filename, revision, commit, checksum)


def _checksum(path: Path, git_blob: bool) -> str:
    """SHA-256 of the file, or git's blob SHA-1 (what the Hub reports for small files)."""
    digest = hashlib.sha1() if git_blob else hashlib.sha256()
    if git_blob:
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_missing_file(error: BaseException) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return False
    return isinstance(error, EntryNotFoundError)


def _is_network_error(error: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return False
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _NETWORK_ERROR_NAMES for cls in type(error).__mro__
    )


def _explain(error: BaseException, repo: str, revision: str, settings: HubSettings, what: str) -> CauseError:
    """One sentence for a failed request to the Hub."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{settings.endpoint}/{repo}"
    unreachable = CauseError(
        f"Cannot reach the Hub at {settings.endpoint} and {what} is not cached; connect to the network "
        "(or set HF_ENDPOINT to a reachable mirror) and try again."
    )
    if isinstance(error, LocalEntryNotFoundError):  # huggingface_hub's "no connection and not in my cache"
        return unreachable
    login = "then log in with 'hf auth login' or set HF_TOKEN to a token of that account"
    status = _status(error)
    if isinstance(error, GatedRepoError) or (isinstance(error, HfHubHTTPError) and status == 403):
        return CauseError(f"The Hub repository {repo} is gated: accept its licence on {page} and {login}.")
    if isinstance(error, RepositoryNotFoundError):
        if status == 401:
            return CauseError(
                f"The Hub repository {repo} is private, gated or missing: check the name, accept its licence "
                f"on {page} if it has one, and {login}."
            )
        return CauseError(f"The Hub has no repository {repo}.")
    if isinstance(error, RevisionNotFoundError):
        return CauseError(f"The Hub repository {repo} has no revision '{revision}'.")
    if isinstance(error, EntryNotFoundError):
        return CauseError(f"The Hub repository {repo} (revision {revision}) lacks a file the download needs.")
    if isinstance(error, HfHubHTTPError) and status == 401:
        return CauseError(f"The Hub refused the request for {repo} (401): accept its licence on {page} and {login}.")
    if isinstance(error, HfHubHTTPError):
        return CauseError(f"The Hub at {settings.endpoint} answered HTTP {status} for {repo}; try again later.")
    if isinstance(error, FileMetadataError):
        return CauseError(
            f"{settings.endpoint} does not answer like a Hugging Face Hub (check HF_ENDPOINT and any proxy)."
        )
    if _is_network_error(error):
        return unreachable
    library = type(error).__module__.split(".")[0]
    if isinstance(error, OSError) or library in ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3"):
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        return CauseError(f"Downloading {what} from {repo} failed: {first_line}.")
    raise error
