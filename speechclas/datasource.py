"""Where a training's clips come from, and the record of it in the run folder.

A training reads ``data_dir``, or, when ``data_url`` is set, that archive
downloaded once into ``data/downloads/<hash of the URL>/`` and shared by
later trainings of the same URL. `open_data_dir` is the one place that
decides; the run then records the folder it really used
(``conf/data_source.json``), and `run_data_dir` reads it back for batch
prediction of the run's split lists.

The download cache is safe to share between processes: a lock file per URL
lets one process download while the others wait and then reuse; a download
goes into a hidden sibling folder renamed into place only when complete, so
a failed or killed one leaves nothing that looks usable (its leftovers are
removed at the next start, under the lock); and the cache is bounded in
total size, the least recently used folders removed first, never one a
training holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speechclas.archive import download_and_extract
from speechclas.config import Config, project_dir
from speechclas.fetch import UrlPolicy, redact_url
from speechclas.limits import Limits
from speechclas.rundir import RunDir

logger = logging.getLogger(__name__)

DOWNLOADS_DIR = Path("data") / "downloads"
_ENTRY = re.compile(r"^[0-9a-f]{16}$")
_LEFTOVER = re.compile(r"^\.([0-9a-f]{16})\.(partial|evict)-")
_RECORD = "source.json"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The folder of label folders a training reads, and the URL it was downloaded from."""

    data_dir: Path  # absolute, links resolved
    data_url: str | None = None  # without credentials

    def record(self, splits_dir: Path | None) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "data_url": self.data_url,
            "splits_from_files": splits_dir is not None,
            "splits_dir": str(splits_dir) if splits_dir is not None else None,
        }


@contextlib.contextmanager
def _locked(path: Path, mode: int, *, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on `path` (created if missing); yields False when `wait` is off and it is taken.

    flock belongs to the open file, so two threads of one process exclude
    each other as two processes do; the lock ends when the file is closed,
    also when the process is killed.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


class DownloadCache:
    """The unpacked ``data_url`` archives in one folder, one sub-folder per URL.

    Per URL hash ``key`` there are two lock files in ``.locks/``: ``key.fetch``
    is held exclusively while the URL is checked or downloaded, ``key.use``
    is held shared by every training reading the folder. Eviction needs both
    exclusively and never waits for them, so a folder in use is never removed.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._locks = self.folder / ".locks"

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]

    @contextlib.contextmanager
    def use(self, url: str, policy: UrlPolicy) -> Iterator[Path]:
        """The data folder of `url`'s archive, downloaded now or earlier; not evicted while open."""
        key = self.key(url)
        entry = self.folder / key
        self._locks.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as held:
            with _locked(self._locks / f"{key}.fetch", fcntl.LOCK_EX):
                self._remove_leftovers(key)
                data_dir = self._complete(entry)
                downloaded = data_dir is None
                if downloaded:
                    data_dir = self._download(url, key, policy)
                else:
                    logger.info("Using %s, downloaded earlier from %s", data_dir, redact_url(url))
                now = time.time_ns()  # os.utime(entry) alone would take the kernel's coarse clock
                os.utime(entry, ns=(now, now))  # most recently used
                # Taken before the download lock is let go, so no eviction fits in between.
                held.enter_context(_locked(self._locks / f"{key}.use", fcntl.LOCK_SH))
            if downloaded:
                self.evict(keep=key)
            yield data_dir

    def _complete(self, entry: Path) -> Path | None:
        """The data folder of a finished download, or None when there is none."""
        try:
            record = json.loads((entry / _RECORD).read_text())
            data_dir = entry / record["data_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return data_dir if data_dir.is_dir() else None

    def _remove_leftovers(self, key: str) -> None:
        """What a killed download or eviction of `key` left; the caller holds its fetch lock."""
        for path in self.folder.glob(f".{key}.*"):
            logger.info("Removing %s, left by an interrupted download", path)
            shutil.rmtree(path, ignore_errors=True)
        entry = self.folder / key
        if entry.exists() and self._complete(entry) is None:  # an older layout, or damaged
            shutil.rmtree(entry, ignore_errors=True)
        (self.folder / f"{key}.complete").unlink(missing_ok=True)  # marker of the older layout

    def _download(self, url: str, key: str, policy: UrlPolicy) -> Path:
        """Download and unpack into a hidden sibling, then rename it into place."""
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=self.folder))
        try:
            data_dir = download_and_extract(url, staging / "data", policy)
            record = {
                "url": redact_url(url),
                "data_dir": data_dir.relative_to(staging).as_posix(),
                "bytes": _tree_bytes(staging),
                "downloaded": dt.datetime.now().isoformat(timespec="seconds"),
            }
            (staging / _RECORD).write_text(json.dumps(record, indent=1))
            entry = self.folder / key
            os.rename(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return entry / record["data_dir"]

    def _entry_bytes(self, entry: Path) -> int:
        try:
            return int(json.loads((entry / _RECORD).read_text())["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return _tree_bytes(entry)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used folders until the cache fits `max_bytes`; answers their keys.

        `keep` (the folder just downloaded) and folders in use are never
        removed, so the cache can stay above its bound until they are let go.
        """
        self._locks.mkdir(parents=True, exist_ok=True)
        removed = []
        with _locked(self._locks / "cache", fcntl.LOCK_EX):
            self._sweep_leftovers()
            entries = []
            for path in self.folder.iterdir():
                if path.is_dir() and _ENTRY.match(path.name):
                    entries.append((path.stat().st_mtime, path.name, self._entry_bytes(path)))
            total = sum(size for _, _, size in entries)
            for _, key, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if key != keep and self._remove_unused(key):
                    total -= size
                    removed.append(key)
        if removed:
            logger.info("Removed %d cached downloads to keep %s under %d bytes", len(removed), self.folder,
                        self.max_bytes)
        if total > self.max_bytes:
            logger.warning("%s holds %d bytes, above its %d bytes: the rest is in use", self.folder, total,
                           self.max_bytes)
        return removed

    def _remove_unused(self, key: str) -> bool:
        with (
            _locked(self._locks / f"{key}.fetch", fcntl.LOCK_EX, wait=False) as fetching,
            _locked(self._locks / f"{key}.use", fcntl.LOCK_EX, wait=False) as unused,
        ):
            if not (fetching and unused):
                return False
            # A rename first: a removal cut short leaves a leftover, not a damaged entry.
            doomed = Path(tempfile.mkdtemp(prefix=f".{key}.evict-", dir=self.folder))
            os.rename(self.folder / key, doomed / key)
            shutil.rmtree(doomed, ignore_errors=True)
            (self.folder / f"{key}.complete").unlink(missing_ok=True)
        logger.info("Removed the cached download %s (least recently used)", key)
        return True

    def _sweep_leftovers(self) -> None:
        """Leftovers of other URLs whose process is gone (their fetch lock is free)."""
        for key in sorted({m.group(1) for p in self.folder.iterdir() if (m := _LEFTOVER.match(p.name))}):
            with _locked(self._locks / f"{key}.fetch", fcntl.LOCK_EX, wait=False) as free:
                if free:
                    self._remove_leftovers(key)


def downloads_dir(base_dir: Path | None = None) -> Path:
    return (base_dir or project_dir()) / DOWNLOADS_DIR


@contextlib.contextmanager
def open_data_dir(config: Config, base_dir: Path | None, limits: Limits) -> Iterator[DataSource]:
    """The data a training reads: ``data_dir``, or ``data_url`` downloaded under the operator's
    URL policy (`Limits`) into the shared cache, which keeps it while the context is open.

    Raises fetch.FetchError or archive.ArchiveError for a URL that cannot be used.
    """
    if not config.data_url:
        yield DataSource(data_dir=config.path("data_dir", base_dir).resolve())
        return
    cache = DownloadCache(downloads_dir(base_dir), limits.download_cache_bytes)
    with cache.use(config.data_url, UrlPolicy.for_dataset(limits)) as data_dir:
        yield DataSource(data_dir=data_dir.resolve(), data_url=redact_url(config.data_url))


def resolve_data_dir(config: Config, base_dir: Path | None, limits: Limits) -> Path:
    """The data folder of `open_data_dir`, for a caller that reads it at once or not at all."""
    with open_data_dir(config, base_dir, limits) as source:
        return source.data_dir


def write_record(run: RunDir, source: DataSource, splits_dir: Path | None) -> None:
    """Record in the run which data it was trained on (whether `splits_dir`'s lists decided the split)."""
    run.data_source_path.parent.mkdir(parents=True, exist_ok=True)
    run.data_source_path.write_text(json.dumps(source.record(splits_dir), indent=2))


def run_data_dir(run: RunDir) -> Path:
    """The data folder a run was trained on, where its split lists point.

    Runs made before the record existed fall back to conf.json's data_dir
    (relative to the project), which is right unless they used a data_url.
    """
    try:
        return Path(json.loads(run.data_source_path.read_text())["data_dir"])
    except FileNotFoundError:
        pass
    data_dir = Path(run.settings()["data_dir"])
    return data_dir if data_dir.is_absolute() else project_dir() / data_dir
