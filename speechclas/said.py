"""A data folder said by the synthesis engines: keywords trained from text alone (`text_only`).

A user who has no recordings names the words; the installed engines'
speakers (`synthetic_voices` x `synthetic_speakers`) say each of them, and say
`unknown_words` (the lexicon's near-misses, other words and phrases when it is
empty) as the words to refuse. The clips are written as an ordinary data folder
(`<word>/<speaker>_nohash_<n>.wav`, `_background_noise_/`), so the training,
its evaluation, exports and streaming evaluation run exactly as on recordings,
and a user can listen to what the model learnt from. Speakers are split into
training, validation and test by quota, so even a handful of speakers gives
each held-out split one: the accuracies then measure speakers the training
never heard, of the same engines.

The folder is an entry of a FolderCache next to the prepared shards: a second
training of the same words, engines, speakers and seed reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import soundfile as sf

from speechclas import data, lexicon, noise, voices
from speechclas.cache import FolderCache

logger = logging.getLogger(__name__)

SPLITS_FOLDER = "splits"  # train.txt, val.txt and test.txt of the folder's own split
NOISE_SECONDS = 60.0  # each generated background-noise file, when data_dir has none
FORMAT = 1


class SaidCache(FolderCache):
    """Data folders said by the engines, one entry per set of words, engines, speakers and seed."""

    what = "said dataset"

    def usable(self, entry: Path, record: dict) -> bool:
        return record.get("format") == FORMAT and (entry / SPLITS_FOLDER).is_dir()


def said_cache(shard_cache_folder: Path, max_bytes: int) -> SaidCache:
    """The cache of said folders, inside the shard cache's folder (its size bound is the shards')."""
    return SaidCache(Path(shard_cache_folder) / "said", max_bytes)


def description(config, sample_rate: int, clip_samples: int, noise_files: Sequence[Path]) -> dict:
    """Everything that decides a said folder (its cache key is a hash of this)."""
    return {"format": FORMAT, "words": list(config.wanted_words), "engines": list(config.synthetic_voices),
            "speakers": config.synthetic_speakers, "unknown_words": list(config.unknown_words or (lexicon.LEXICON_ITEM,)),
            "unknown_word_clips": config.unknown_word_clips, "seed": config.random_seed,
            "sample_rate": sample_rate, "clip_samples": clip_samples,
            "validation_percentage": config.validation_percentage, "testing_percentage": config.testing_percentage,
            "noise": [[str(path), os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in noise_files]}


def speaker_splits(speakers: Sequence[str], validation_percentage: float, testing_percentage: float) -> dict[str, str]:
    """Each speaker's split: in the order of a hash of its id, validation and test take their
    percentages, at least one each when there are three speakers or more."""
    order = sorted(speakers, key=lambda speaker: hashlib.sha1(speaker.encode()).hexdigest())
    count = len(order)
    held = [max(1, round(count * pct / 100)) if count >= 3 and pct > 0 else 0
            for pct in (validation_percentage, testing_percentage)]
    splits = {}
    for number, speaker in enumerate(order):
        splits[speaker] = ("validation" if number < held[0] else
                           "testing" if number < held[0] + held[1] else "training")
    return splits


def write_folder(staging: Path, clips: voices.SyntheticClips, wanted_words: Sequence[str], sample_rate: int,
                 splits: dict[str, str], noise_files: Sequence[Path], seed: int) -> dict[str, int]:
    """The said clips as a data folder with its split lists and background noise; answers clips per split."""
    wanted = set(wanted_words)
    lines: dict[str, list[str]] = {split: [] for split in data.SPLITS}
    numbers: dict[tuple[str, str], int] = {}
    for audio, text, speaker in zip(clips.audio, clips.words, clips.speakers, strict=True):
        folder = text if text in wanted else lexicon.folder_name(text)
        if folder in wanted and text not in wanted:
            folder = f"{folder}-unknown"  # never a wanted word's folder
        number = numbers.get((folder, speaker), 0)
        numbers[(folder, speaker)] = number + 1
        relative = f"{folder}/{speaker}_nohash_{number}.wav"
        (staging / folder).mkdir(exist_ok=True)
        sf.write(staging / relative, audio, sample_rate, subtype="PCM_16")
        lines[splits[speaker]].append(relative)
    (staging / SPLITS_FOLDER).mkdir()
    for split, name in data.SPLIT_FILES.items():
        (staging / SPLITS_FOLDER / name).write_text("".join(f"{line}\n" for line in lines[split]))
    background = staging / data.BACKGROUND_NOISE_DIR
    if noise_files:
        background.mkdir()
        for path in noise_files:
            shutil.copy2(path, background / path.name)
    else:
        noise.write_background_noise(background, NOISE_SECONDS, seed, sample_rate)
    return {split: len(rows) for split, rows in lines.items()}


def clip_count(config) -> int:
    """Clips a text_only training says: each wanted word by every speaker, plus the unknown clips."""
    return len(config.synthetic_voices) * config.synthetic_speakers * len(config.wanted_words) + config.unknown_word_clips


@contextlib.contextmanager
def said_folder(config, sample_rate: int, clip_samples: int, data_dir: Path, cache: SaidCache,
                jobs: int | None = None) -> Iterator[tuple[Path, dict]]:
    """The said data folder of a text_only training and its record, made now or reused; kept
    from eviction while open. `data_dir`'s `_background_noise_` files, when it has any, are its noise."""
    noise_dir = Path(data_dir) / data.BACKGROUND_NOISE_DIR
    noise_files = sorted(path for path in noise_dir.glob("*.wav")) if noise_dir.is_dir() else []
    described = description(config, sample_rate, clip_samples, noise_files)
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    def fill(staging: Path) -> dict:
        unknown = lexicon.unknown_texts(config.wanted_words, described["unknown_words"], config.unknown_word_clips,
                                        config.random_seed)
        clips = voices.synthesize_clips(config.wanted_words, config.synthetic_voices, config.synthetic_speakers,
                                        config.random_seed, sample_rate, clip_samples, jobs or os.cpu_count() or 1,
                                        unknown=unknown)
        speakers = [speaker.id for speaker in voices.engine_speakers(
            config.synthetic_voices, config.synthetic_speakers, config.random_seed)]
        splits = speaker_splits(speakers, config.validation_percentage, config.testing_percentage)
        counts = write_folder(staging, clips, config.wanted_words, sample_rate, splits, noise_files,
                              config.random_seed)
        logger.info("text_only: said %d clips (%s) into %s", len(clips.words),
                    ", ".join(f"{split} {count}" for split, count in counts.items()), cache.folder / key)
        return {**described, "clips": counts, "failures": [list(failure) for failure in clips.failures]}

    if cache.is_complete(key):
        logger.info("text_only: using the words said earlier (%s)", cache.folder / key)
    with cache.entry(key, fill) as (entry, record):
        yield entry, record
