"""A folder of cached entries shared by processes: filled once, renamed into place, bounded in size.

Both the unpacked ``data_url`` downloads (speechclas.datasource) and the
decoded dataset shards (speechclas.shards) are entries of such a cache, one
sub-folder per key. A lock file per key lets one process fill an entry while
the others wait and then reuse it; an entry is filled in a hidden sibling
folder renamed into place only when complete, so a failed or killed fill
leaves nothing that looks usable (its leftovers are removed at the next
start, under the lock); and the cache is bounded in total size, the least
recently used entries removed first, never one a process holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_ENTRY = re.compile(r"^[0-9a-f]{16}$")
_LEFTOVER = re.compile(r"^\.([0-9a-f]{16})\.(partial|evict)-")
RECORD = "source.json"


@contextlib.contextmanager
def locked(path: Path, mode: int, *, wait: bool = True) -> Iterator[bool]:
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


def tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


class FolderCache:
    """Entries in one folder, one sub-folder per 16-hex-digit key, with a ``source.json`` record each.

    Per key there are two lock files in ``.locks/``: ``key.fetch`` is held
    exclusively while the entry is checked or filled, ``key.use`` is held
    shared by every process reading it. Eviction needs both exclusively and
    never waits for them, so an entry in use is never removed.
    """

    what = "cached entry"  # how log lines name an entry

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._locks = self.folder / ".locks"

    @contextlib.contextmanager
    def entry(self, key: str, fill: Callable[[Path], dict[str, Any]]) -> Iterator[tuple[Path, dict[str, Any]]]:
        """The entry of `key` and its record, filled now by `fill(staging folder)` (which answers
        the record) or earlier; not evicted while the context is open."""
        if not _ENTRY.match(key):
            raise ValueError(f"a cache key is 16 hexadecimal digits, not {key!r}")
        entry = self.folder / key
        self._locks.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as held:
            with locked(self._locks / f"{key}.fetch", fcntl.LOCK_EX):
                self._remove_leftovers(key)
                record = self._record(entry)
                filled = record is None
                if filled:
                    record = self._fill(key, fill)
                now = time.time_ns()  # os.utime(entry) alone would take the kernel's coarse clock
                os.utime(entry, ns=(now, now))  # most recently used
                # Taken before the fill lock is let go, so no eviction fits in between.
                held.enter_context(locked(self._locks / f"{key}.use", fcntl.LOCK_SH))
            if filled:
                self.evict(keep=key)
            yield entry, record

    def is_complete(self, key: str) -> bool:
        return self._record(self.folder / key) is not None

    def _record(self, entry: Path) -> dict[str, Any] | None:
        """The record of a finished entry (None when there is none); subclasses check more."""
        try:
            record = json.loads((entry / RECORD).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and self.usable(entry, record) else None

    def usable(self, entry: Path, record: dict[str, Any]) -> bool:
        """Whether a finished entry's content is what its record says (an override's check)."""
        return True

    def _remove_leftovers(self, key: str) -> None:
        """What a killed fill or eviction of `key` left; the caller holds its fetch lock."""
        for path in self.folder.glob(f".{key}.*"):
            logger.info("Removing %s, left by an interrupted %s", path, self.what)
            shutil.rmtree(path, ignore_errors=True)
        entry = self.folder / key
        if entry.exists() and self._record(entry) is None:  # an older layout, or damaged
            shutil.rmtree(entry, ignore_errors=True)
        (self.folder / f"{key}.complete").unlink(missing_ok=True)  # marker of the older layout

    def _fill(self, key: str, fill: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Fill a hidden sibling, then rename it into place."""
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=self.folder))
        try:
            record = dict(fill(staging))
            record["bytes"] = tree_bytes(staging)
            (staging / RECORD).write_text(json.dumps(record, indent=1))
            os.rename(staging, self.folder / key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return record

    def _entry_bytes(self, entry: Path) -> int:
        try:
            return int(json.loads((entry / RECORD).read_text())["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return tree_bytes(entry)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the cache fits `max_bytes`; answers their keys.

        `keep` (the entry just filled) and entries in use are never removed,
        so the cache can stay above its bound until they are let go.
        """
        self._locks.mkdir(parents=True, exist_ok=True)
        removed = []
        with locked(self._locks / "cache", fcntl.LOCK_EX):
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
            logger.info("Removed %d %ss to keep %s under %d bytes", len(removed), self.what, self.folder,
                        self.max_bytes)
        if total > self.max_bytes:
            logger.warning("%s holds %d bytes, above its %d bytes: the rest is in use", self.folder, total,
                           self.max_bytes)
        return removed

    def _remove_unused(self, key: str) -> bool:
        with (
            locked(self._locks / f"{key}.fetch", fcntl.LOCK_EX, wait=False) as fetching,
            locked(self._locks / f"{key}.use", fcntl.LOCK_EX, wait=False) as unused,
        ):
            if not (fetching and unused):
                return False
            # A rename first: a removal cut short leaves a leftover, not a damaged entry.
            doomed = Path(tempfile.mkdtemp(prefix=f".{key}.evict-", dir=self.folder))
            os.rename(self.folder / key, doomed / key)
            shutil.rmtree(doomed, ignore_errors=True)
            (self.folder / f"{key}.complete").unlink(missing_ok=True)
        logger.info("Removed the %s %s (least recently used)", self.what, key)
        return True

    def _sweep_leftovers(self) -> None:
        """Leftovers of other keys whose process is gone (their fetch lock is free)."""
        for key in sorted({m.group(1) for p in self.folder.iterdir() if (m := _LEFTOVER.match(p.name))}):
            with locked(self._locks / f"{key}.fetch", fcntl.LOCK_EX, wait=False) as free:
                if free:
                    self._remove_leftovers(key)
