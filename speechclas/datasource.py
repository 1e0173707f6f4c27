"""Where a training's clips come from, and the record of it in the run folder.

A training reads ``data_dir``, or, when ``data_url`` is set, that archive
downloaded once into ``data/downloads/<hash of the URL>/`` and shared by
later trainings of the same URL. `open_data_dir` is the one place that
decides; the run then records the folder it really used
(``conf/data_source.json``), and `run_data_dir` reads it back for batch
prediction of the run's split lists.

The download cache is a speechclas.cache.FolderCache: safe to share between
processes, filled atomically, bounded in total size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speechclas.archive import download_and_extract
from speechclas.cache import FolderCache
from speechclas.config import Config, project_dir
from speechclas.fetch import UrlPolicy, redact_url
from speechclas.limits import Limits
from speechclas.rundir import RunDir

logger = logging.getLogger(__name__)

DOWNLOADS_DIR = Path("data") / "downloads"


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


class DownloadCache(FolderCache):
    """The unpacked ``data_url`` archives in one folder, one entry per URL (speechclas.cache)."""

    what = "download"

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]

    @contextlib.contextmanager
    def use(self, url: str, policy: UrlPolicy) -> Iterator[Path]:
        """The data folder of `url`'s archive, downloaded now or earlier; not evicted while open."""

        def download(staging: Path) -> dict[str, Any]:
            data_dir = download_and_extract(url, staging / "data", policy)
            return {"url": redact_url(url), "data_dir": data_dir.relative_to(staging).as_posix(),
                    "downloaded": dt.datetime.now().isoformat(timespec="seconds")}

        key = self.key(url)
        reused = self.is_complete(key)
        with self.entry(key, download) as (entry, record):
            if reused:
                logger.info("Using %s, downloaded earlier from %s", entry / record["data_dir"], redact_url(url))
            yield entry / record["data_dir"]

    def usable(self, entry: Path, record: dict[str, Any]) -> bool:
        return isinstance(record.get("data_dir"), str) and (entry / record["data_dir"]).is_dir()


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
