"""A data folder decoded once into TFRecord shards on disk, cached by content and read by tf.data.

Decoding (any format, any rate, resampled and placed in the model window) is
the slow part of reading a dataset, and holding the decoded clips in memory
bounds the dataset by the machine. So a training decodes its folder once into
shards of ``tf.train.Example`` records (int16 audio, the label folder, the
speaker, the split and the source path) and every later training streams
from them. TFRecord is what tf.data reads natively, in parallel and by file,
which is what sharding across workers needs.

The shards are an entry of a `speechclas.cache.FolderCache` (safe between
processes, atomic, bounded in size) keyed by the folder's content: every
clip's path, split, size and mtime, the sample rate and clip length it was
decoded at and the audio bounds that decided which clips are usable. A
training with other model settings reuses them; an added or changed clip,
another split or another clip length makes a new version. The label is the
clip's folder, not a class index, so the wanted words may change too.

Clips are written in a seeded random order (a shard mixes every word), in
shards of `shard_clips` clips, decoded by a pool of processes one shard at a time:
memory is bounded by one shard whatever the dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from speechclas.audio import AudioLimits
from speechclas.cache import FolderCache
from speechclas.config import project_dir
from speechclas.data import SPLITS, DatasetIndex, SkippedClip, decode_clip, speaker_of

logger = logging.getLogger(__name__)

# Bumped when the records change; part of every key, so old shards are never misread.
FORMAT_VERSION = 2
# Clips per shard: 128 MiB of 1 s clips at 16 kHz, the size tf.data's readers like (100-200 MB).
SHARD_CLIPS = 4096
SHARDS_DIR = Path("data") / "shards"
SYNTHETIC_SPLIT = "training"
# A streamed dataset's evaluation features are cached in memory up to this size a split, else recomputed each pass.
EVAL_CACHE_BYTES = 512 * 2**20
# Clips of a streamed split (in the shards' seeded order) that the exports' accuracies and the
# streaming evaluation score: 16 MB a split, and more than a 2-hour evaluation stream uses.
SAMPLED_CLIPS = 5000


def held_in_memory(data_loading: str, clips: int, desired_samples: int, in_memory_max_mb: int) -> bool:
    """data_loading's choice for a folder of `clips` clips (every split): auto holds them in memory
    when their int16 samples fit `in_memory_max_mb` (faster there: batches are gathered, not
    parsed), else streams them from the shards."""
    if data_loading != "auto":
        return data_loading == "memory"
    return clips * desired_samples * 2 <= in_memory_max_mb * 2**20


@dataclasses.dataclass(frozen=True)
class Clip:
    """One record of a shard."""

    audio: np.ndarray  # int16 [desired_samples]
    label: str  # the clip's folder (a word), not a class index
    speaker: str
    split: str
    path: str  # relative to the data folder (synthetic clips: engine/speaker/word)


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """A prepared dataset: per split its shard files and how many clips of each label they hold."""

    folder: Path
    sample_rate: int
    desired_samples: int
    files: dict[str, tuple[Path, ...]]
    counts: dict[str, dict[str, int]]  # split -> label -> clips
    file_counts: dict[str, tuple[dict[str, int], ...]] = dataclasses.field(default_factory=dict)  # per file of files
    skipped: tuple[SkippedClip, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the preparer recorded besides

    def clip_count(self, split: str, labels: Iterable[str] | None = None) -> int:
        counts = self.counts.get(split, {})
        return sum(counts.values()) if labels is None else sum(counts.get(label, 0) for label in labels)

    def split_files(self, split: str) -> list[str]:
        return [str(path) for path in self.files.get(split, ())]

    def file_labels(self, split: str) -> list[set[str]]:
        """The labels each shard file of `split` holds, in the order of split_files."""
        return [set(counts) for counts in self.file_counts.get(split, ())]

    @classmethod
    def from_record(cls, folder: Path, record: dict[str, Any]) -> ShardSet:
        return cls(
            folder=folder,
            sample_rate=int(record["sample_rate"]),
            desired_samples=int(record["desired_samples"]),
            files={split: tuple(folder / name for name in entry["files"]) for split, entry in record["splits"].items()},
            counts={split: dict(entry["counts"]) for split, entry in record["splits"].items()},
            file_counts={split: tuple(entry["file_counts"]) for split, entry in record["splits"].items()},
            skipped=tuple(SkippedClip(item["path"], item["reason"]) for item in record.get("skipped", ())),
            extra=dict(record.get("extra", {})),
        )


class ShardCache(FolderCache):
    """The prepared datasets of this machine (``SPEECHCLAS_SHARD_CACHE_DIR``), one entry per version."""

    what = "prepared dataset"

    def usable(self, entry: Path, record: dict[str, Any]) -> bool:
        if record.get("format") != FORMAT_VERSION or not isinstance(record.get("splits"), dict):
            return False
        return all((entry / name).is_file() for split in record["splits"].values() for name in split["files"])


def shard_cache(folder: str | Path, max_bytes: int, base_dir: Path | None = None) -> ShardCache:
    """The cache at `folder` (empty: the project's data/shards/; relative: from the project)."""
    root = base_dir or project_dir()
    path = Path(folder) if folder else SHARDS_DIR
    return ShardCache(path if path.is_absolute() else root / path, max_bytes)


def dataset_key(index: DatasetIndex, sample_rate: int, desired_samples: int, bounds: AudioLimits) -> str:
    """The version of a data folder's shards: its clips (path, split, size, mtime) and how they are decoded."""
    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "sample_rate": sample_rate, "desired_samples": desired_samples,
              "bounds": [bounds.max_seconds, bounds.max_channels, bounds.min_sample_rate, bounds.max_sample_rate]}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for split in SPLITS:
        for example in sorted(index.splits[split], key=lambda e: e.path):
            try:
                stat = os.stat(index.data_dir / example.path)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # decoding reports it
                size, mtime = -1, -1
            digest.update(f"{split}\0{example.path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def synthetic_key(description: dict[str, Any]) -> str:
    """The version of a set of synthetic clips: everything that decides them (engines, speakers, seed, words)."""
    payload = json.dumps({"format": FORMAT_VERSION, "synthetic": description}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- writing ----------------------------------------------------------------------------


def _bytes_feature(value: bytes):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def serialize(clip: Clip) -> bytes:
    import tensorflow as tf

    features = {
        "audio": _bytes_feature(np.ascontiguousarray(clip.audio, dtype="<i2").tobytes()),
        "label": _bytes_feature(clip.label.encode()),
        "speaker": _bytes_feature(clip.speaker.encode()),
        "split": _bytes_feature(clip.split.encode()),
        "path": _bytes_feature(clip.path.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


class ShardWriter:
    """Writes clips of each split into numbered shard files of `shard_clips` clips in one folder."""

    def __init__(self, folder: Path, shard_clips: int = SHARD_CLIPS):
        self.folder = folder
        self.shard_clips = shard_clips
        self.files: dict[str, list[str]] = {split: [] for split in SPLITS}
        self.counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
        self.file_counts: dict[str, list[dict[str, int]]] = {split: [] for split in SPLITS}

    def write(self, split: str, clips: Sequence[Clip]) -> None:
        """One shard of `clips` (at most shard_clips), all of `split`."""
        import tensorflow as tf

        if not clips:
            return
        name = f"{split}-{len(self.files[split]):05d}.tfrecord"
        in_file: dict[str, int] = {}
        with tf.io.TFRecordWriter(str(self.folder / name)) as writer:
            for clip in clips:
                writer.write(serialize(clip))
                in_file[clip.label] = in_file.get(clip.label, 0) + 1
        for label, count in in_file.items():
            self.counts[split][label] = self.counts[split].get(label, 0) + count
        self.files[split].append(name)
        self.file_counts[split].append(in_file)

    def record(self, sample_rate: int, desired_samples: int, **extra) -> dict[str, Any]:
        """What the cache keeps in the entry's source.json."""
        return {
            "format": FORMAT_VERSION,
            "sample_rate": sample_rate,
            "desired_samples": desired_samples,
            "splits": {split: {"files": self.files[split], "counts": self.counts[split],
                               "file_counts": self.file_counts[split]} for split in SPLITS},
            "prepared": dt.datetime.now().isoformat(timespec="seconds"),
            **extra,
        }


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _decode_example(data_dir: Path, sample_rate: int, desired_samples: int, bounds: AudioLimits, relative: str):
    """decode_clip with the path last, for a process pool's map."""
    return decode_clip(data_dir, relative, sample_rate, desired_samples, bounds)


def write_dataset(
    folder: Path, index: DatasetIndex, sample_rate: int, desired_samples: int, bounds: AudioLimits, *,
    jobs: int, shard_clips: int = SHARD_CLIPS, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Decode every clip of `index` into shards in `folder`; answers the record. Unusable clips are
    skipped, logged and listed in the record. `jobs` processes (one: this one) decode one shard's clips at a time."""
    started = time.monotonic()
    writer = ShardWriter(folder, shard_clips)
    skipped: list[SkippedClip] = []
    total = sum(len(index.splits[split]) for split in SPLITS)
    bar = tqdm(total=total, desc="Preparing clips", unit="clip", disable=not progress or total < 200)
    decode = functools.partial(_decode_example, index.data_dir, sample_rate, desired_samples, bounds)
    with contextlib.ExitStack() as stack:
        mapped = map
        if jobs > 1:  # processes: decoding threads would hand the GIL to and fro (slower than one thread)
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")))

            def mapped(function, items):
                return pool.map(function, items, chunksize=64)

        for split in SPLITS:
            examples = sorted(index.splits[split], key=lambda e: e.path)
            random.Random(f"{seed}-{split}").shuffle(examples)  # every shard mixes the words
            for chunk in _chunks(examples, shard_clips):
                decoded = mapped(decode, [example.path for example in chunk])
                clips = []
                for example, clip in zip(chunk, decoded, strict=True):
                    if isinstance(clip, SkippedClip):
                        logger.warning("Skipped clip %s: %s", clip.path, clip.reason)
                        skipped.append(clip)
                    else:
                        clips.append(Clip(clip, example.word, speaker_of(example.path), split, example.path))
                    bar.update(1)
                writer.write(split, clips)
    bar.close()
    duration = time.monotonic() - started
    logger.info("Prepared %d clips of %s in %.1f s (%d skipped)", total - len(skipped), index.data_dir, duration,
                len(skipped))
    return writer.record(sample_rate, desired_samples, data_dir=str(index.data_dir), duration_s=round(duration, 1),
                         skipped=[{"path": clip.path, "reason": clip.reason} for clip in skipped])


def write_clips(
    folder: Path, split: str, clips: Iterable[Clip], sample_rate: int, desired_samples: int,
    shard_clips: int = SHARD_CLIPS, **extra,
) -> dict[str, Any]:
    """Clips already decoded (synthetic ones) into shards of one split; answers the record."""
    writer = ShardWriter(folder, shard_clips)
    pending: list[Clip] = []
    for clip in clips:
        pending.append(clip)
        if len(pending) == shard_clips:
            writer.write(split, pending)
            pending = []
    writer.write(split, pending)
    return writer.record(sample_rate, desired_samples, extra=extra)


@contextlib.contextmanager
def open_entry(cache: FolderCache, key: str, fill: Callable[[Path], dict[str, Any]]) -> Iterator[ShardSet]:
    """The ShardSet of entry `key`, filled by `fill(staging folder)` when missing; kept while open."""
    with cache.entry(key, fill) as (entry, record):
        yield ShardSet.from_record(entry, record)


def prepare(
    cache: ShardCache, index: DatasetIndex, sample_rate: int, desired_samples: int, bounds: AudioLimits, *,
    jobs: int | None = None, shard_clips: int = SHARD_CLIPS, progress: bool = True,
):
    """A context manager over the ShardSet of `index`: prepared now, or reused when this version exists."""
    key = dataset_key(index, sample_rate, desired_samples, bounds)
    if cache.is_complete(key):
        logger.info("Using the prepared clips of %s (%s)", index.data_dir, cache.folder / key)
    return open_entry(cache, key, lambda staging: write_dataset(
        staging, index, sample_rate, desired_samples, bounds, jobs=jobs or os.cpu_count() or 1,
        shard_clips=shard_clips, seed=int(key, 16) % 2**31, progress=progress))


# --- reading ----------------------------------------------------------------------------


def parse(serialized, desired_samples: int) -> dict:
    """A record as tensors: audio int16 [desired_samples], label, speaker, split and path strings."""
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in ("audio", "label", "speaker", "split", "path")}
    record = tf.io.parse_single_example(serialized, spec)
    audio = tf.io.decode_raw(record["audio"], tf.int16, little_endian=True)
    record["audio"] = tf.ensure_shape(audio, [desired_samples])
    return record


def parse_fields(serialized, names: Sequence[str] = ("label",)) -> dict:
    """Only the named string fields of a record: what filtering a stream needs, without copying the audio."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, {name: tf.io.FixedLenFeature([], tf.string) for name in names})


def read_clips(files: Sequence[str | Path], desired_samples: int) -> list[Clip]:
    """Every record of `files`, in order, as numpy (tests, small evaluation sets)."""
    import tensorflow as tf

    clips = []
    for serialized in tf.data.TFRecordDataset([str(f) for f in files]):
        record = parse(serialized, desired_samples)
        clips.append(Clip(record["audio"].numpy(), *(record[k].numpy().decode() for k in
                                                      ("label", "speaker", "split", "path"))))
    return clips
