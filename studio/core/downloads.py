"""Fetching a preset's files from the Hugging Face Hub, and keeping the Hub cache under a disk budget.

Downloads run in their own step, outside the device lock: a visitor waiting for a multi-gigabyte download must not
hold the GPU. One lock per source means two visitors asking for the same uncached repo download it once (the second
waits and follows the same progress), while different repos download in parallel.

The budget deletes whole revisions, least recently used first, through huggingface_hub's cache API
(`scan_cache_dir`, `HFCacheInfo.delete_revisions`), so the cache stays in the layout every HF library reads.

The locks are per process: two server processes sharing one cache may both download a repo (huggingface_hub's own
file locks keep the cache consistent) and each enforces the budget with only its own sources protected.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from huggingface_hub import constants as hub_constants
from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hub_tqdm

from studio.core.errors import ModelUnavailable

logger = logging.getLogger("studio.core.downloads")

ProgressCallback = Callable[[int, int, str], None]  # (done, total, description), same as elsewhere in studio

GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class DownloadRequest:
    source: str  # Hub repo id, e.g. "stabilityai/stable-diffusion-xl-base-1.0"; or a local folder path
    allow_patterns: tuple[str, ...]  # glob patterns of files to fetch, e.g. ("model_index.json", "unet/*.fp16.safetensors")
    label: str  # the preset's label, for messages, e.g. "SDXL base 1.0"
    revision: str | None = None


# --- Which files a diffusers preset needs -----------------------------------------------------------------------


def diffusers_patterns(subfolders: Iterable[str], variant: str | None, weightless: Iterable[str]) -> tuple[str, ...]:
    """Patterns for a diffusers repo's model_index.json and the given component subfolders: configs and, for weighted
    components, safetensors weights of the variant (e.g. 'unet/diffusion_pytorch_model.fp16.safetensors' or
    'text_encoder/model.fp16.safetensors'; with variant None the non-variant '*.safetensors' files only, NOT the
    '.fp16.' ones), plus all files of the `weightless` subfolders (tokenizer vocab, scheduler config: the model
    families say which)."""
    weightless = set(weightless)
    patterns = ["model_index.json"]
    for folder in subfolders:
        folder = folder.strip("/")
        if folder in weightless:
            patterns.append(f"{folder}/*")
        else:
            patterns.extend(weighted_component_patterns(folder, variant))
    return tuple(dict.fromkeys(patterns))  # unique, in order


def weighted_component_patterns(folder: str, variant: str | None) -> tuple[str, ...]:
    """config.json plus the component's safetensors, single file or sharded (with its index), named as diffusers
    and transformers save them: 'model.fp16.safetensors', 'model.fp16-00001-of-00002.safetensors',
    'model.safetensors.index.fp16.json'; without a variant 'model.safetensors', 'model-00001-of-00002.safetensors'."""
    if variant:
        return (f"{folder}/config.json",
                f"{folder}/*.{variant}.safetensors",
                f"{folder}/*.{variant}-*-of-*.safetensors",
                f"{folder}/*.safetensors.index.{variant}.json")
    # '*model.safetensors' rather than '*.safetensors': fnmatch has no "not", and '*.safetensors' would also fetch
    # every 'model.<variant>.safetensors' (gigabytes of weights the pipeline never loads).
    return (f"{folder}/config.json",
            f"{folder}/*model.safetensors",
            f"{folder}/*model-*-of-*.safetensors",
            f"{folder}/*.safetensors.index.json")


def concrete_files(patterns: Iterable[str]) -> list[str]:
    """The patterns that name one file (no wildcard, not a folder): those must exist for a snapshot to count as cached."""
    return [p for p in patterns if not (GLOB_CHARACTERS & set(p)) and not p.endswith("/")]


def missing_files(snapshot: str | Path, patterns: Iterable[str]) -> list[str]:
    return [name for name in concrete_files(patterns) if not (Path(snapshot) / name).is_file()]


# --- Sources ----------------------------------------------------------------------------------------------------


def is_local_folder(source: str) -> bool:
    """A Hub repo id is 'name' or 'org/name'; presets give local folders as absolute paths (presets.py resolves them)."""
    return os.path.isabs(source) or source.startswith((".", "~")) or Path(source).exists()


def checked_local_folder(request: DownloadRequest) -> str:
    if not Path(request.source).expanduser().is_dir():
        raise ModelUnavailable(f"{request.label}: the folder {request.source} does not exist. "
                               "Check the preset's `local` path, or pick another preset.")
    return request.source


def hub_offline_by_env() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import (its HTTP layer obeys that value)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in {"1", "ON", "YES", "TRUE"} or hub_constants.is_offline_mode()


# --- Errors that teach ------------------------------------------------------------------------------------------


def offline_error(requests: DownloadRequest | list[DownloadRequest]) -> ModelUnavailable:
    """One sentence naming the preset, and the commands that download the missing files (from each repo)."""
    requests = [requests] if isinstance(requests, DownloadRequest) else list(requests)
    return ModelUnavailable(
        f"{requests[0].label} is not downloaded yet, and the Hugging Face Hub cannot be reached: connect to the "
        "internet and try again, or pick the embedded preset, which works offline.",
        command="\n".join(download_command(request, one_per_line=True) for request in requests))


def download_command(request: DownloadRequest, one_per_line: bool = False) -> str:
    """The `hf download` command that fetches exactly the request's files (the whole repo can be tens of GB);
    `one_per_line` puts each --include on a line of its own (shell line continuations), to be read on a page."""
    # one --include per pattern: `hf download` takes the words after the first as file names
    return (" \\\n    " if one_per_line else " ").join(
        [f"hf download {request.source}", *(f"--include {shlex.quote(pattern)}" for pattern in request.allow_patterns)])


def unavailable_error(request: DownloadRequest, error: Exception) -> ModelUnavailable:
    """One line saying why the Hub refused, and what to do about it."""
    repo, label = request.source, request.label
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return ModelUnavailable(f"{label}: {repo} is gated. Accept its licence on https://huggingface.co/{repo} and "
                                "log in with `hf auth login` (or set HF_TOKEN), then try again.")
    if isinstance(error, RepositoryNotFoundError):
        return ModelUnavailable(f"{label}: the Hub has no repo {repo!r}, or it is private "
                                "(log in with `hf auth login`). Check the preset's `repo`.")
    if isinstance(error, RevisionNotFoundError):
        return ModelUnavailable(f"{label}: {repo} has no revision {request.revision!r}. Check the preset's revision.")
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
        return offline_error(request)  # the Hub was unreachable and the cache does not hold the files
    if isinstance(error, HFValidationError):
        return ModelUnavailable(f"{label}: {repo!r} is neither a Hub repo id ('org/name') nor an existing folder.")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return ModelUnavailable(f"{label}: the disk filled up while downloading {repo}. "
                                "Free some space or lower the Hub cache budget.")
    if isinstance(error, HfHubHTTPError):
        return ModelUnavailable(f"{label}: the Hub refused the download of {repo} ({one_line(error)}).")
    return ModelUnavailable(f"{label}: could not download {repo} ({type(error).__name__}: {one_line(error)}).")


def one_line(error: Exception, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- Progress ---------------------------------------------------------------------------------------------------


def human_size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} GB"


class ForwardingTqdm(hub_tqdm):
    """A tqdm that draws nothing and forwards snapshot_download's bytes bar to a ProgressCallback.

    snapshot_download (huggingface_hub 2.4) makes three bars from `tqdm_class`: the bytes written to disk
    (unit "B", name "huggingface_hub.snapshot_download"; its total grows as each file starts), the network bytes
    (name "...transfer"; its total is only an estimate) and a files count. Only the first is forwarded: it ends
    exactly at the download's size. Subclassing huggingface_hub's tqdm makes it pass `name`.
    Use `forwarding_tqdm_class` to bind a callback.
    """

    report: ProgressCallback | None = None
    label: str = ""

    def __init__(self, *args, **kwargs):
        name = kwargs.get("name") or ""
        self._forwards = kwargs.get("unit") == "B" and not name.endswith(".transfer")
        self._count_lock = threading.Lock()  # files download in parallel threads
        kwargs["disable"] = True  # progress goes to the visitor's page, not the server console
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> None:
        if not n:
            return
        with self._count_lock:
            self.n += n  # a disabled tqdm counts nothing itself; huggingface_hub reads `n` of its bars
            if self._forwards and self.report is not None:
                # Reported under the lock so that `done` arrives in increasing order across threads.
                done, total = int(self.n), int(max(self.total or 0, self.n))
                self.report(done, total, f"Downloading {self.label}: {human_size(done)} of {human_size(total)}")


def forwarding_tqdm_class(report: ProgressCallback, label: str) -> type[ForwardingTqdm]:
    """A ForwardingTqdm subclass bound to `report` (snapshot_download wants a class, not an instance)."""
    return type("DownloadProgress", (ForwardingTqdm,), {"report": staticmethod(report), "label": label})


class SourceState:
    """Per-source lock, and the progress listeners of everyone waiting on it: a visitor who arrives while another
    downloads the same repo follows that download's progress instead of a silent wait."""

    def __init__(self):
        self.lock = threading.Lock()
        self._listeners: list[ProgressCallback] = []
        self._listeners_lock = threading.Lock()

    @contextmanager
    def listening(self, on_progress: ProgressCallback | None) -> Iterator[None]:
        if on_progress is None:
            yield
            return
        with self._listeners_lock:
            self._listeners.append(on_progress)
        try:
            yield
        finally:
            with self._listeners_lock:
                if on_progress in self._listeners:  # unless broadcast dropped it
                    self._listeners.remove(on_progress)

    def listener_count(self) -> int:
        with self._listeners_lock:
            return len(self._listeners)

    def broadcast(self, done: int, total: int, description: str) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(done, total, description)
            except Exception:  # one visitor's broken progress display must not fail the download for the others
                logger.exception("A download progress callback failed; it gets no more updates, the download goes on.")
                with self._listeners_lock:
                    if listener in self._listeners:
                        self._listeners.remove(listener)


# --- Least recently used ----------------------------------------------------------------------------------------


def last_used(repo, revision) -> float:
    """When a cached revision was last used: the newest access (or download) time of the blobs only it holds.

    Why blob_last_accessed rather than CachedRevisionInfo.last_modified: last_modified is the newest blob *mtime*,
    i.e. when the revision was downloaded, so a model downloaded long ago but used every day would be evicted first.
    Reading a blob (from_pretrained does) updates its atime -- but relatime/noatime mounts update it rarely or never,
    so `HubDownloads.ensure` also sets it explicitly (`mark_used`). A blob shared with another revision of the repo
    says nothing about which one was used (after an upstream update the old revision shares most blobs with the new
    one, and would look as recent), so only the revision's own blobs count, unless it has none.
    """
    others = {file.blob_path for other in repo.revisions if other.commit_hash != revision.commit_hash
              for file in other.files}
    own = [file for file in revision.files if file.blob_path not in others] or list(revision.files)
    return max((max(file.blob_last_accessed, file.blob_last_modified) for file in own),
               default=revision.last_modified)


def mark_used(snapshot: str | Path) -> None:
    """Set the access time of the snapshot's blobs to now (keeping their mtime): the budget's LRU order reads it."""
    now = time.time()
    for path in Path(snapshot).rglob("*"):
        try:
            if path.is_file():  # follows the snapshot's symlink to its blob, as os.utime does
                os.utime(path, (now, path.stat().st_mtime))
        except OSError as error:  # a read-only cache still works, its LRU order just follows the kernel's atime
            logger.debug("Could not mark %s as used: %s", path, error)


def revision_id(repo, revision) -> str:
    return f"{repo.repo_id}@{revision.commit_hash}"


# --- The downloader ---------------------------------------------------------------------------------------------


class HubDownloads:
    """Fetches presets' files into the Hub cache (one download per source at a time) and keeps the cache under
    `disk_budget` bytes by deleting least recently used revisions.

    Callers that load the returned snapshot should hold `in_use(source)` from before `ensure` until the model is
    loaded (or for as long as it stays loaded), so that another visitor's download cannot evict it meanwhile."""

    def __init__(self, cache_dir: str | Path | None = None, disk_budget: int | None = None,
                 offline: Callable[[], bool] | None = None):
        if disk_budget is not None and disk_budget <= 0:
            raise ValueError(f"disk_budget must be a positive number of bytes or None (no limit), not {disk_budget}.")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else Path(hub_constants.HF_HUB_CACHE)
        self.disk_budget = disk_budget
        self._offline = offline or hub_offline_by_env
        self._states: dict[str, SourceState] = {}
        self._states_lock = threading.Lock()
        self._in_use: dict[str, int] = {}  # source -> number of holders
        self._in_use_lock = threading.Lock()
        self._budget_lock = threading.Lock()  # two enforcements at once would plan with stale scans
        self._fetched: set[tuple] = set()  # requests already checked against the Hub by this process

    # Fetching

    def ensure(self, request: DownloadRequest, on_progress: ProgressCallback | None = None) -> str:
        """Local path of the snapshot holding the request's files; downloads them first when needed.

        A local folder source is returned as is (after checking it exists). Offline, only the cache is read.
        Online, the first ensure of a request in this process asks the Hub (new commits, missing files); later ones,
        and visitors who waited for that first one, are served from the cache without a network call.
        Then the disk budget is enforced, sparing the revision just ensured and the sources in use.
        Raises ModelUnavailable with a message saying what to do."""
        if is_local_folder(request.source):
            return checked_local_folder(request)
        state = self._state(request.source)
        with self.in_use(request.source), state.listening(on_progress), state.lock:
            snapshot = self._fetch(request, state)
            mark_used(snapshot)
        self._enforce_budget(keep={Path(snapshot).name})
        return snapshot

    def is_offline(self) -> bool:
        """True when the Hub is not to be asked (HF_HUB_OFFLINE, or no connection as the studio was told)."""
        return self._offline()

    def is_cached(self, request: DownloadRequest) -> bool:
        """True when the cache holds the request's files, read without network: every pattern naming a concrete file
        is there and, when snapshot_download recorded the repo's file list, no file matching a pattern is missing."""
        if is_local_folder(request.source):
            return Path(request.source).expanduser().is_dir()
        return self._cached_snapshot(request) is not None

    def _fetch(self, request: DownloadRequest, state: SourceState) -> str:
        key = (request.source, request.revision, request.allow_patterns)
        offline = self._offline()
        if offline or key in self._fetched:
            snapshot = self._cached_snapshot(request)
            if snapshot is not None:
                return snapshot
            if offline:
                raise offline_error(request)
        snapshot = self._download(request, state)
        missing = missing_files(snapshot, request.allow_patterns)
        if missing:
            raise ModelUnavailable(f"{request.label}: {request.source} has no {', '.join(missing)}. "
                                   "Check the preset's repo, variant and components.")
        self._fetched.add(key)
        return snapshot

    def _download(self, request: DownloadRequest, state: SourceState) -> str:
        logger.info("Fetching %s from %s", request.label, request.source)
        try:
            return snapshot_download(
                request.source,
                allow_patterns=list(request.allow_patterns),
                revision=request.revision,
                cache_dir=self.cache_dir,
                local_files_only=False,
                tqdm_class=forwarding_tqdm_class(state.broadcast, request.label),
            )
        except Exception as error:
            raise unavailable_error(request, error) from error

    def _cached_snapshot(self, request: DownloadRequest) -> str | None:
        """The snapshot folder if the cache holds the request's files, else None. Never touches the network."""
        try:
            snapshot = snapshot_download(
                request.source,
                allow_patterns=list(request.allow_patterns),
                revision=request.revision,
                cache_dir=self.cache_dir,
                local_files_only=True,
            )
        except LocalEntryNotFoundError:  # no snapshot for that revision, or IncompleteSnapshotError
            return None
        except HFValidationError as error:
            raise unavailable_error(request, error) from error
        # Without a recorded file list snapshot_download returns any existing snapshot folder, even a partial one.
        return None if missing_files(snapshot, request.allow_patterns) else snapshot

    def _state(self, source: str) -> SourceState:
        with self._states_lock:
            return self._states.setdefault(source, SourceState())

    # Protection

    def protect(self, source: str) -> None:
        """Revisions of a protected source are never deleted by the budget. Calls nest: unprotect as often."""
        with self._in_use_lock:
            self._in_use[source] = self._in_use.get(source, 0) + 1

    def unprotect(self, source: str) -> None:
        with self._in_use_lock:
            holders = self._in_use.get(source, 0)
            if holders <= 0:
                raise ValueError(f"{source!r} is not protected: unprotect() must follow a protect().")
            if holders == 1:
                del self._in_use[source]
            else:
                self._in_use[source] = holders - 1

    @contextmanager
    def in_use(self, source: str) -> Iterator[None]:
        self.protect(source)
        try:
            yield
        finally:
            self.unprotect(source)

    def protected_sources(self) -> set[str]:
        with self._in_use_lock:
            return set(self._in_use)

    # Disk budget

    def enforce_budget(self) -> list[str]:
        """Delete least recently used revisions (see `last_used`) until the cache's size_on_disk is within the budget,
        sparing revisions of protected sources. Returns the deleted revisions as 'repo_id@commit' strings."""
        return self._enforce_budget(keep=set())

    def _enforce_budget(self, keep: set[str]) -> list[str]:
        if self.disk_budget is None:
            return []
        with self._budget_lock:
            try:
                cache = scan_cache_dir(self.cache_dir)
            except CacheNotFound:
                return []
            if cache.size_on_disk <= self.disk_budget:
                return []
            chosen = self._revisions_to_delete(cache, keep)
            if not chosen:
                self._warn_over_budget(cache.size_on_disk)
                return []
            strategy = cache.delete_revisions(*(revision.commit_hash for _, revision in chosen))
            for repo, revision in chosen:
                logger.info("Deleting %s (%s, last used %s) to keep the Hub cache under %s",
                            revision_id(repo, revision), human_size(revision.size_on_disk),
                            time.strftime("%Y-%m-%d %H:%M", time.localtime(last_used(repo, revision))),
                            human_size(self.disk_budget))
            strategy.execute()
            remaining = cache.size_on_disk - strategy.expected_freed_size
            if remaining > self.disk_budget:
                self._warn_over_budget(remaining)
            return [revision_id(repo, revision) for repo, revision in chosen]

    def _revisions_to_delete(self, cache, keep: set[str]) -> list:
        """Least recently used first, until the planned deletion brings the cache within the budget. The freed size is
        asked of delete_revisions for the whole plan each time: revisions of one repo share blobs, so sizes don't add."""
        protected = self.protected_sources()
        candidates = sorted(
            ((repo, revision) for repo in cache.repos for revision in repo.revisions
             if revision.commit_hash not in keep and repo.repo_id not in protected),
            key=lambda pair: last_used(*pair))
        chosen = []
        for repo, revision in candidates:
            chosen.append((repo, revision))
            freed = cache.delete_revisions(*(rev.commit_hash for _, rev in chosen)).expected_freed_size
            if cache.size_on_disk - freed <= self.disk_budget:
                break
        return chosen

    def _warn_over_budget(self, size: int) -> None:
        logger.warning("The Hub cache holds %s, over its budget of %s, but the rest is in use or was just fetched.",
                       human_size(size), human_size(self.disk_budget))
