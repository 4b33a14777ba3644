"""studio.core.downloads against a fake but real-format Hugging Face cache; no test touches the network."""

import errno
import hashlib
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._xet_progress_reporting import _finish_transfer_bar, _set_aggregate_rate_postfix
from huggingface_hub.utils.tqdm import _create_progress_bar, hf_thread_map
from tqdm.auto import tqdm as auto_tqdm

from studio.core import downloads
from studio.core.downloads import DownloadRequest, HubDownloads, diffusers_patterns, forwarding_tqdm_class
from studio.core.errors import ModelUnavailable
from studio.models.loading import WEIGHTLESS

DAY = 24 * 3600
NOW = time.time()
REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import; its HTTP layer checks this constant and raises OfflineModeIsEnabled.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


# --- A fake Hub cache, in the layout huggingface_hub writes -----------------------------------------------------


def commit_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def sized(text: str, size: int) -> bytes:
    return text.encode().ljust(size, b"\0")


def cache_revision(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                   ref: str | None = "main", downloaded: float = NOW, used: float | None = None) -> Path:
    """One revision: blobs/<sha256>, snapshots/<commit>/<path> as relative symlinks to them, refs/<ref> holding the
    commit (without a newline: scan_cache_dir reads refs unstripped). Blob mtime = `downloaded`, atime = `used`."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or commit_of(repo_id)
    snapshot = repo_dir / "snapshots" / commit
    for name, content in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        os.utime(blob, (used if used is not None else downloaded, downloaded))
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def model_files(repo_id: str, size: int) -> dict[str, bytes]:
    """A tiny diffusers-like repo of exactly `size` bytes."""
    return {"model_index.json": sized(f"{repo_id} index", 100),
            "unet/diffusion_pytorch_model.safetensors": sized(f"{repo_id} unet", size - 100)}


# Four repos whose LRU order (by last use) differs from their download order:
#   last used:  d 30 days ago, b 10, c 5, a 1      downloaded: d 40 days ago, a 30, b 20, c 5
REPOS = {
    "org/a": dict(size=1000, downloaded=NOW - 30 * DAY, used=NOW - 1 * DAY),
    "org/b": dict(size=2000, downloaded=NOW - 20 * DAY, used=NOW - 10 * DAY),
    "org/c": dict(size=3000, downloaded=NOW - 5 * DAY, used=None),
    "org/d": dict(size=4000, downloaded=NOW - 40 * DAY, used=NOW - 30 * DAY),
}


@pytest.fixture
def cache(tmp_path) -> Path:
    cache = tmp_path / "hub"
    for repo_id, spec in REPOS.items():
        cache_revision(cache, repo_id, model_files(repo_id, spec["size"]),
                       downloaded=spec["downloaded"], used=spec["used"])
    return cache


def cached_repos(cache: Path) -> set[str]:
    return {repo.repo_id for repo in scan_cache_dir(cache).repos}


def rev(repo_id: str) -> str:
    return f"{repo_id}@{commit_of(repo_id)}"


def request_for(repo_id: str, label: str = "Test model") -> DownloadRequest:
    return DownloadRequest(repo_id, ("model_index.json", "unet/*.safetensors"), label)


# --- The fake cache is what huggingface_hub reads ---------------------------------------------------------------


def test_scan_cache_dir_reads_the_fake_cache(cache):
    info = scan_cache_dir(cache)
    assert not info.warnings
    assert info.size_on_disk == 10_000
    sizes = {repo.repo_id: repo.size_on_disk for repo in info.repos}
    assert sizes == {"org/a": 1000, "org/b": 2000, "org/c": 3000, "org/d": 4000}
    repos = {repo.repo_id: repo for repo in info.repos}
    revisions = {repo_id: next(iter(repo.revisions)) for repo_id, repo in repos.items()}
    assert revisions["org/a"].refs == frozenset({"main"})
    assert revisions["org/a"].nb_files == 2
    order = sorted(revisions, key=lambda repo_id: downloads.last_used(repos[repo_id], revisions[repo_id]))
    assert order == ["org/d", "org/b", "org/c", "org/a"]
    by_download = sorted(revisions, key=lambda repo_id: revisions[repo_id].last_modified)
    assert by_download == ["org/d", "org/a", "org/b", "org/c"]  # so the tests below tell the two orders apart


# --- Disk budget ------------------------------------------------------------------------------------------------


def test_enforce_budget_deletes_least_recently_used_until_within_budget(cache, caplog):
    caplog.set_level(logging.INFO, logger="studio.core.downloads")
    deleted = HubDownloads(cache, disk_budget=5000).enforce_budget()
    # d (last used 30 days ago) leaves 6000 > 5000, then b (10 days) leaves 4000. By download time it would be d, a.
    assert deleted == [rev("org/d"), rev("org/b")]
    assert cached_repos(cache) == {"org/a", "org/c"}
    assert scan_cache_dir(cache).size_on_disk == 4000
    assert not (cache / "models--org--d").exists()
    logged = [r.getMessage() for r in caplog.records if r.name == "studio.core.downloads"]
    assert any(rev("org/d") in message for message in logged)
    assert any(rev("org/b") in message for message in logged)


def test_enforce_budget_deletes_nothing_within_budget(cache):
    assert HubDownloads(cache, disk_budget=10_000).enforce_budget() == []
    assert HubDownloads(cache).enforce_budget() == []  # no budget, no limit
    assert cached_repos(cache) == set(REPOS)
    assert scan_cache_dir(cache).size_on_disk == 10_000


def test_enforce_budget_spares_protected_sources(cache):
    hub = HubDownloads(cache, disk_budget=5000)
    hub.protect("org/b")
    assert hub.enforce_budget() == [rev("org/d"), rev("org/c")]  # skips b: d then c leaves 3000
    assert cached_repos(cache) == {"org/a", "org/b"}
    hub.unprotect("org/b")
    with pytest.raises(ValueError, match="not protected"):
        hub.unprotect("org/b")


def test_enforce_budget_spares_sources_in_use(cache):
    hub = HubDownloads(cache, disk_budget=5000)
    with hub.in_use("org/d"), hub.in_use("org/d"):  # nests
        assert hub.enforce_budget() == [rev("org/b"), rev("org/c")]  # 8000, then 5000
    assert cached_repos(cache) == {"org/a", "org/d"}
    assert hub.protected_sources() == set()


def test_enforce_budget_counts_blobs_shared_between_revisions_once(tmp_path):
    cache = tmp_path / "hub"
    shared = sized("shared unet", 1000)
    cache_revision(cache, "org/e", {"unet/w.safetensors": shared, "model_index.json": sized("old", 500)},
                   commit=commit_of("e-old"), ref=None, downloaded=NOW - 20 * DAY, used=NOW - 10 * DAY)
    cache_revision(cache, "org/e", {"unet/w.safetensors": shared, "model_index.json": sized("new", 700)},
                   commit=commit_of("e-new"), downloaded=NOW - 2 * DAY, used=NOW - 1 * DAY)
    cache_revision(cache, "org/f", model_files("org/f", 2000), downloaded=NOW - 5 * DAY)
    assert scan_cache_dir(cache).size_on_disk == 4200
    # e's old revision was last used 10 days ago: the shared blob's recent atime comes from the new revision.
    # Deleting e's old revision frees only its own 500 bytes (its 1000-byte blob stays for the new one): not enough
    # for 3000, so f goes too. Adding up revision sizes (1500) would have stopped after the old revision, at 3700.
    deleted = HubDownloads(cache, disk_budget=3000).enforce_budget()
    assert deleted == [f"org/e@{commit_of('e-old')}", rev("org/f")]
    info = scan_cache_dir(cache)
    assert info.size_on_disk == 1700
    (repo,) = info.repos
    assert [r.commit_hash for r in repo.revisions] == [commit_of("e-new")]
    assert (repo.repo_path / "snapshots" / commit_of("e-new") / "unet" / "w.safetensors").read_bytes() == shared


def test_ensure_keeps_the_revision_it_ensured_even_over_budget(cache, caplog):
    caplog.set_level(logging.INFO, logger="studio.core.downloads")
    hub = HubDownloads(cache, disk_budget=500)  # smaller than any repo
    snapshot = hub.ensure(request_for("org/c", "Model C"))
    assert Path(snapshot).name == commit_of("org/c")
    assert cached_repos(cache) == {"org/c"}
    assert any(r.levelno == logging.WARNING and "over its budget" in r.getMessage() for r in caplog.records)


def test_ensure_marks_the_revision_used(cache):
    """c was the second least recently used; once ensured it is the most recent, so the budget takes d and b."""
    hub = HubDownloads(cache)
    hub.ensure(request_for("org/d"))
    hub.disk_budget = 5000
    assert hub.enforce_budget() == [rev("org/b"), rev("org/c")]  # d, just used, is spared; a is next and survives
    assert cached_repos(cache) == {"org/a", "org/d"}


# --- ensure() ---------------------------------------------------------------------------------------------------


def test_ensure_returns_a_local_folder_as_is(tmp_path):
    hub = HubDownloads(tmp_path / "hub")
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert hub.ensure(DownloadRequest(str(folder), (), "Mine")) == str(folder)
    assert hub.is_cached(DownloadRequest(str(folder), (), "Mine"))
    with pytest.raises(ModelUnavailable, match=r"Gone: the folder .*missing does not exist"):
        hub.ensure(DownloadRequest(str(tmp_path / "missing"), (), "Gone"))


def test_ensure_offline_and_uncached_says_what_to_do(tmp_path):
    cache = tmp_path / "hub"
    # A snapshot folder exists but lacks the weights' index: snapshot_download alone would return it.
    cache_revision(cache, "org/partial", {"unet/config.json": b"{}"})
    hub = HubDownloads(cache, offline=lambda: True)
    for repo_id in ("org/missing", "org/partial"):
        request = DownloadRequest(repo_id, ("model_index.json", "unet/config.json"), "Fancy XL")
        assert not hub.is_cached(request)
        with pytest.raises(ModelUnavailable) as raised:
            hub.ensure(request)
        error = raised.value
        # one sentence naming the preset, for the page; the command apart, for the page to offer to copy
        assert error.reason.startswith("Fancy XL is not downloaded yet") and "\n" not in error.reason
        assert error.reason.count(". ") == 0 and "embedded preset" in error.reason
        # its files only, one --include each (hf takes words after the first pattern as file names), one a line
        words = subprocess.run(["bash", "-c", f"printf '%s\\n' {error.command.removeprefix('hf ')}"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        assert words == ["download", repo_id, "--include", "model_index.json", "--include", "unet/config.json"]
        assert error.command.count("\n") == 2
        assert str(error) == f"{error.reason}\nTo download its files:\n{error.command}"  # the API's message: both


def test_ensure_offline_and_cached_returns_the_snapshot_without_network(cache, monkeypatch):
    calls = []

    def recording_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return REAL_SNAPSHOT_DOWNLOAD(repo_id, **kwargs)

    monkeypatch.setattr(downloads, "snapshot_download", recording_snapshot_download)
    hub = HubDownloads(cache)  # offline from HF_HUB_OFFLINE=1
    request = request_for("org/a")
    assert hub.is_cached(request)
    snapshot = hub.ensure(request)
    assert snapshot == str(cache.resolve() / "models--org--a" / "snapshots" / commit_of("org/a"))
    assert (Path(snapshot) / "model_index.json").read_bytes() == sized("org/a index", 100)
    assert calls and all(call["local_files_only"] for call in calls)


def drive_progress(tqdm_class, sizes: list[int], chunk: int = 1000) -> None:
    """Make the progress bars snapshot_download (huggingface_hub 2.4) makes, the way it makes them, and download
    `sizes` bytes in parallel threads: a network-bytes bar, a bytes-written bar whose total grows as each file
    starts, and hf_thread_map's file-count bar."""
    transfer = _create_progress_bar(cls=tqdm_class, log_level=logging.INFO, desc="Downloading bytes",
                                    name="huggingface_hub.snapshot_download.transfer", total=0, initial=0,
                                    unit="B", unit_scale=True)
    written = _create_progress_bar(cls=tqdm_class, log_level=logging.INFO, desc="Reconstructing",
                                   name="huggingface_hub.snapshot_download", total=0, initial=0,
                                   unit="B", unit_scale=True)
    total_lock = threading.Lock()

    def download(size: int) -> None:
        with total_lock:
            written.total += size
            transfer.total += size
        for start in range(0, size, chunk):
            transfer.update(min(chunk, size - start) // 2)  # compressed on the wire
            written.update(min(chunk, size - start))
            _set_aggregate_rate_postfix(written)

    hf_thread_map(download, sizes, desc=f"Fetching {len(sizes)} files", max_workers=3, tqdm_class=tqdm_class)
    _finish_transfer_bar(transfer)
    transfer.set_description_str("Download complete")
    written.set_description("Reconstruction complete")


def test_progress_is_forwarded_from_the_bytes_written_bar():
    reports = []
    tqdm_class = forwarding_tqdm_class(lambda *report: reports.append(report), "SDXL base 1.0")
    assert issubclass(tqdm_class, auto_tqdm)  # what snapshot_download asks of tqdm_class
    drive_progress(tqdm_class, [3000, 5000, 1200])
    done = [d for d, _, _ in reports]
    assert len(reports) == 3 + 5 + 2  # one per chunk written; transfer and file-count bars are not forwarded
    assert done == sorted(set(done))  # strictly increasing
    assert reports[-1][:2] == (9200, 9200)
    assert all(d <= total for d, total, _ in reports)
    assert reports[-1][2] == "Downloading SDXL base 1.0: 9.2 KB of 9.2 KB"


class FakeHub:
    """Stands in for snapshot_download: local_files_only calls go to the real one (they read the cache); a download
    drives progress like the real one and writes the repo's files into the cache, after `before_download(repo_id)`."""

    def __init__(self, files: dict[str, dict[str, bytes]], before_download=lambda repo_id: None):
        self.files = files
        self.before_download = before_download
        self.downloads: list[str] = []
        self.kwargs: list[dict] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def __call__(self, repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, **kwargs)
        with self.lock:
            self.downloads.append(repo_id)
            self.kwargs.append(kwargs)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.before_download(repo_id)
            wanted = {name: self.files[repo_id][name]
                      for name in filter_repo_objects(self.files[repo_id], allow_patterns=kwargs["allow_patterns"])}
            drive_progress(kwargs["tqdm_class"], [len(content) for content in wanted.values()])
            return str(cache_revision(Path(kwargs["cache_dir"]), repo_id, wanted))
        finally:
            with self.lock:
                self.active -= 1


def test_same_source_downloads_once_while_different_sources_overlap(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    hub = HubDownloads(cache, offline=lambda: False)
    both_downloading = threading.Barrier(2, timeout=5)  # breaks unless a's and b's downloads run at the same time
    a_started = threading.Event()

    def before_download(repo_id):
        if repo_id == "org/a":
            a_started.set()
            deadline = time.monotonic() + 5
            while hub._state("org/a").listener_count() < 2:  # the second visitor is waiting on a's lock
                assert time.monotonic() < deadline, "the second visitor never came"
                time.sleep(0.005)
        both_downloading.wait()

    repo_files = {"unet/config.json": b"{}", "unet/diffusion_pytorch_model.fp16.safetensors": b"fp16"}
    fake = FakeHub({repo_id: model_files(repo_id, 3000) | repo_files for repo_id in ("org/a", "org/b")},
                   before_download)
    monkeypatch.setattr(downloads, "snapshot_download", fake)
    results, errors, progress = {}, [], {"first": [], "second": [], "b": []}

    def visit(name, repo_id):
        request = DownloadRequest(repo_id, diffusers_patterns(["unet"], None, WEIGHTLESS), f"Model {repo_id}")
        try:
            results[name] = hub.ensure(request, on_progress=lambda *report: progress[name].append(report))
        except Exception as error:  # reported below, with the thread's name
            errors.append((name, error))

    threads = {name: threading.Thread(target=visit, args=(name, repo_id))
               for name, repo_id in (("first", "org/a"), ("b", "org/b"), ("second", "org/a"))}
    threads["first"].start()
    threads["b"].start()
    assert a_started.wait(5)
    threads["second"].start()
    for thread in threads.values():
        thread.join(10)
    assert errors == []
    assert sorted(fake.downloads) == ["org/a", "org/b"]  # a once, for two visitors
    assert fake.max_active == 2
    assert results["first"] == results["second"] == str(cache.resolve() / "models--org--a" / "snapshots"
                                                         / commit_of("org/a"))
    assert progress["second"] and progress["second"][-1][:2] == (3002, 3002)  # the waiter followed the download
    assert progress["first"][-1][:2] == progress["b"][-1][:2] == (3002, 3002)
    call = fake.kwargs[0]
    assert call["local_files_only"] is False and call["revision"] is None
    assert call["allow_patterns"] == list(diffusers_patterns(["unet"], None, WEIGHTLESS))
    assert not (Path(results["first"]) / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()


def hub_error(kind, message):
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return kind(message, response=response)


@pytest.mark.parametrize("error, expected", [
    (hub_error(GatedRepoError, "403 gated\nmore"), "is gated. Accept its licence"),
    (hub_error(RepositoryNotFoundError, "404 Repository Not Found\nmore"), "the Hub has no repo 'org/x'"),
    (LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), "hf download org/x"),
    (OSError(errno.ENOSPC, "No space left on device"), "the disk filled up"),
    (RuntimeError("boom\ntraceback detail"), "could not download org/x (RuntimeError: boom)."),
])
def test_ensure_turns_hub_errors_into_one_line_advice(tmp_path, monkeypatch, error, expected):
    def failing_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, **kwargs)
        raise error

    monkeypatch.setattr(downloads, "snapshot_download", failing_download)
    hub = HubDownloads(tmp_path / "hub", offline=lambda: False)
    with pytest.raises(ModelUnavailable) as raised:
        hub.ensure(request_for("org/x", "Model X"))
    message = str(raised.value)
    assert expected in message and message.startswith("Model X")
    # one line (an offline error's download command comes on lines of its own, after it)
    assert "\n" not in raised.value.reason and raised.value.__cause__ is error


def test_ensure_says_which_files_the_repo_lacks(tmp_path, monkeypatch):
    fake = FakeHub({"org/a": {"model_index.json": b"{}"}})
    monkeypatch.setattr(downloads, "snapshot_download", fake)
    hub = HubDownloads(tmp_path / "hub", offline=lambda: False)
    with pytest.raises(ModelUnavailable, match=r"Model A: org/a has no unet/config.json\. Check the preset"):
        hub.ensure(DownloadRequest("org/a", diffusers_patterns(["unet"], "fp16", WEIGHTLESS), "Model A"))


# --- Which files ------------------------------------------------------------------------------------------------

SDXL_FILES = [
    "model_index.json", "README.md", "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin", "unet/openvino_model.xml",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.fp16.json",
    "text_encoder_2/model.fp16-00001-of-00002.safetensors", "text_encoder_2/model.fp16-00002-of-00002.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json",
    "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
]
SDXL_COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
WEIGHTLESS_FILES = {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                    "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer_2/vocab.json",
                    "scheduler/scheduler_config.json"}


def selected(patterns) -> set[str]:
    return set(filter_repo_objects(SDXL_FILES, allow_patterns=list(patterns)))  # as snapshot_download filters


def test_diffusers_patterns_for_fp16():
    assert selected(diffusers_patterns(SDXL_COMPONENTS, "fp16", WEIGHTLESS)) == WEIGHTLESS_FILES | {
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder_2/model.safetensors.index.fp16.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors", "text_encoder_2/model.fp16-00002-of-00002.safetensors"}


def test_diffusers_patterns_without_variant_skip_the_variant_weights():
    assert selected(diffusers_patterns(SDXL_COMPONENTS, None, WEIGHTLESS)) == WEIGHTLESS_FILES | {
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors"}


def test_diffusers_patterns_name_the_configs_as_concrete_files():
    patterns = diffusers_patterns(["unet", "scheduler"], "fp16", weightless=["scheduler"])
    assert patterns[:3] == ("model_index.json", "unet/config.json", "unet/*.fp16.safetensors")
    assert downloads.concrete_files(patterns) == ["model_index.json", "unet/config.json"]
    assert "scheduler/*" in patterns


def test_a_failing_progress_callback_does_not_stop_the_others():
    state = downloads.SourceState()
    good, calls = [], []

    def broken(*report):
        calls.append(report)
        raise RuntimeError("page closed")

    with state.listening(broken), state.listening(lambda *report: good.append(report)):
        for done in (1, 2, 3):
            state.broadcast(done, 3, "Downloading")
    assert good == [(1, 3, "Downloading"), (2, 3, "Downloading"), (3, 3, "Downloading")]
    assert len(calls) == 1 and state.listener_count() == 0
