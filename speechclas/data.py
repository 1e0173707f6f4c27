"""Index a folder of labelled clips, split it by speaker, load it into memory.

Layout: ``data_dir/<label>/<speaker>_nohash_<n>.wav``. Wanted words are
classes of their own, other folders become ``_unknown_``, ``_silence_`` is
synthesised, and ``_background_noise_`` holds long noise clips for mixing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from speechclas.audio import AudioError, AudioLimits, decode_audio, iter_audio_blocks, place_in_window, to_int16
from speechclas.limits import Limits

logger = logging.getLogger(__name__)

SILENCE_LABEL = "_silence_"
UNKNOWN_LABEL = "_unknown_"
BACKGROUND_NOISE_DIR = "_background_noise_"
SPLITS = ("training", "validation", "testing")
SPLIT_FILES = {"training": "train.txt", "validation": "val.txt", "testing": "test.txt"}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
# As in TF's speech_commands: the hash is taken modulo this, so the set of
# a speaker never changes when other files are added.
MAX_NUM_WAVS_PER_CLASS = 2**27 - 1
# Noise files are long by design (speech_commands' are 1 to 5 minutes); each is
# bounded by this instead of the operator's clip duration, and decoded in blocks.
MAX_BACKGROUND_SECONDS = 600.0


class DataError(ValueError):
    """A dataset problem a user can fix (missing folder, empty word, ...)."""


@dataclasses.dataclass(frozen=True)
class Example:
    path: str  # relative to data_dir, with forward slashes
    word: str  # the folder it came from


@dataclasses.dataclass(frozen=True)
class SkippedClip:
    """A file of the dataset that cannot be used (not audio, truncated, out of the audio limits)."""

    path: str  # relative to data_dir
    reason: str


@dataclasses.dataclass(frozen=True)
class LoadedClips:
    """The usable clips of a list, in its order; `kept` maps each row back to its position in the list."""

    audio: np.ndarray  # int16 [kept clips, desired_samples]
    kept: np.ndarray  # int [kept clips]
    skipped: tuple[SkippedClip, ...]


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """What a training sees: the labels and, per split, the clips."""

    data_dir: Path
    labels: tuple[str, ...]
    splits: dict[str, tuple[Example, ...]]
    background_files: tuple[str, ...]
    splits_dir: Path | None = None  # whose split lists decided the split; None: the speaker hash did

    def label_index(self, word: str) -> int:
        """Class index of a folder name: itself if wanted, else _unknown_."""
        return self.labels.index(word) if word in self.labels else self.labels.index(UNKNOWN_LABEL)

    def wanted(self, split: str) -> list[Example]:
        return [e for e in self.splits[split] if e.word in self.labels]

    def unknown(self, split: str) -> list[Example]:
        return [e for e in self.splits[split] if e.word not in self.labels]


def labels_for(wanted_words: Sequence[str]) -> tuple[str, ...]:
    """Class order used everywhere: silence, unknown, then the wanted words."""
    return (SILENCE_LABEL, UNKNOWN_LABEL, *wanted_words)


def speaker_of(filename: str) -> str:
    """The speaker part of a name: everything before ``_nohash_``."""
    name = Path(filename).name
    return re.sub(r"_nohash_.*$", "", name)


def which_set(filename: str, validation_percentage: float, testing_percentage: float) -> str:
    """Stable split by a hash of the speaker, so a speaker stays in one set and
    adding files never moves old ones (the speech_commands rule)."""
    digest = hashlib.sha1(speaker_of(filename).encode("utf-8")).hexdigest()
    percentage = (int(digest, 16) % (MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / MAX_NUM_WAVS_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < testing_percentage + validation_percentage:
        return "testing"
    return "training"


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class SplitLine:
    """One entry of a split list: where it is, what it says, and the clip it names."""

    number: int  # line number, for messages
    text: str
    example: Example | None  # None when the line is not <label>/<file> inside the data folder


def read_split_list(path: Path) -> list[SplitLine]:
    """The entries of a split list (``<label>/<file>`` per line, relative to the data folder).

    The one parser of the lists `write_split_lists` writes, for training and for
    batch prediction. Blank lines and ``#`` comments are skipped; a line that
    is absolute, climbs out with ``..`` or has no label folder gets no example,
    and the caller decides whether that is fatal.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not a text file"
        raise DataError(f"cannot read the split list {path}: {reason}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        relative = line.strip()
        if not relative or relative.startswith("#"):
            continue
        posix = PurePosixPath(relative)
        inside = len(posix.parts) >= 2 and not posix.is_absolute() and ".." not in posix.parts
        example = Example(path=posix.as_posix(), word=posix.parts[-2]) if inside else None
        entries.append(SplitLine(number=number, text=relative, example=example))
    return entries


def _read_split_file(path: Path, data_dir: Path) -> list[Example]:
    """A split list for training: every line must name an existing clip of `data_dir`."""
    examples = []
    for entry in read_split_list(path):
        if entry.example is None:
            raise DataError(
                f"{path}:{entry.number}: expected <label>/<file> relative to the data folder, "
                f"got {entry.text!r}"
            )
        if not (data_dir / entry.example.path).is_file():
            raise DataError(f"{path}:{entry.number}: {entry.text} does not exist in {data_dir}")
        examples.append(entry.example)
    return examples


def index_dataset(
    data_dir: Path,
    wanted_words: Sequence[str],
    validation_percentage: float,
    testing_percentage: float,
    splits_dir: Path | None = None,
) -> DatasetIndex:
    """Find the clips, assign each to a split and check that training can work.

    When ``splits_dir`` holds train.txt, val.txt and test.txt they decide the
    split; otherwise the speaker hash does.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; put one folder of .wav clips per label there")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    word_folders = [p for p in folders if p.name != BACKGROUND_NOISE_DIR]
    files_by_word = {p.name: _audio_files(p) for p in word_folders}
    if not any(files_by_word.values()):
        raise DataError(f"no .wav files found in {data_dir}/<label>/")
    missing = [w for w in wanted_words if not files_by_word.get(w)]
    if missing:
        raise DataError(f"wanted words with no clips in {data_dir}: {', '.join(missing)}")

    split_files = {s: splits_dir / f for s, f in SPLIT_FILES.items()} if splits_dir else {}
    if split_files and all(p.is_file() for p in split_files.values()):
        logger.info("Using the split lists in %s", splits_dir)
        splits = {s: tuple(_read_split_file(split_files[s], data_dir)) for s in SPLITS}
    else:
        splits_dir = None
        buckets: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for word, files in files_by_word.items():
            for path in files:
                split = which_set(path.name, validation_percentage, testing_percentage)
                buckets[split].append(Example(path=f"{word}/{path.name}", word=word))
        splits = {s: tuple(buckets[s]) for s in SPLITS}

    labels = labels_for(wanted_words)
    has_unknown = any(e.word not in labels for e in splits["training"])
    classes_with_data = len(wanted_words) + int(has_unknown)
    if classes_with_data < 2:
        raise DataError(
            "fewer than two classes to learn: name at least two wanted_words, or one word and "
            "other word folders for _unknown_"
        )
    if not splits["training"]:
        raise DataError(f"the training split of {data_dir} is empty")
    for split in ("validation", "testing"):
        if not splits[split]:
            logger.warning("The %s split is empty: add speakers or raise its percentage", split)
    background_dir = data_dir / BACKGROUND_NOISE_DIR
    background = tuple(
        f"{BACKGROUND_NOISE_DIR}/{p.name}" for p in (_audio_files(background_dir) if background_dir.is_dir() else [])
    )
    counts = {s: len(v) for s, v in splits.items()}
    logger.info("Indexed %s: %s clips per split, %d noise files", data_dir, counts, len(background))
    return DatasetIndex(
        data_dir=data_dir, labels=labels, splits=splits, background_files=background, splits_dir=splits_dir
    )


def write_split_lists(index: DatasetIndex, out_dir: Path) -> None:
    """Record which file went where (train.txt, val.txt, test.txt)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, filename in SPLIT_FILES.items():
        lines = [e.path for e in index.splits[split]]
        (out_dir / filename).write_text("".join(f"{line}\n" for line in lines))


def evaluation_examples(
    index: DatasetIndex, split: str, silence_percentage: float, unknown_percentage: float, seed: int
) -> tuple[list[str | None], list[int]]:
    """A fixed evaluation set: every wanted clip, a seeded sample of unknown
    clips and silence entries (path None), sized as percentages of the wanted
    clips as in the speech_commands recipe."""
    wanted = index.wanted(split)
    unknown = index.unknown(split)
    rng = random.Random(f"{seed}-{split}")
    rng.shuffle(unknown)
    unknown_count = min(len(unknown), int(np.ceil(len(wanted) * unknown_percentage / 100)))
    silence_count = int(np.ceil(len(wanted) * silence_percentage / 100))
    paths: list[str | None] = [e.path for e in wanted] + [e.path for e in unknown[:unknown_count]]
    labels = [index.label_index(e.word) for e in wanted] + [index.label_index(UNKNOWN_LABEL)] * unknown_count
    paths += [None] * silence_count
    labels += [index.label_index(SILENCE_LABEL)] * silence_count
    return paths, labels


def decode_clip(
    data_dir: Path, relative: str, sample_rate: int, desired_samples: int, limits: Limits | AudioLimits | None
) -> np.ndarray | SkippedClip:
    """One clip as the model window of int16 samples (audio.place_in_window), or why it cannot be used."""
    try:
        decoded = decode_audio(data_dir / relative, sample_rate, name=relative, limits=limits)
    except AudioError as exc:
        return SkippedClip(relative, str(exc))
    return to_int16(place_in_window(decoded.samples, desired_samples)[0])


def load_clips(
    data_dir: Path,
    paths: Iterable[str | None],
    sample_rate: int,
    desired_samples: int,
    workers: int = 4,
    limits: Limits | AudioLimits | None = None,
) -> LoadedClips:
    """Decode clips once into an int16 array [clips, desired_samples], each
    placed in the window as prediction places its input (audio.place_in_window).

    Kept in memory because a keyword dataset is small (32 KB a clip at 16 kHz)
    and the training pipeline then never waits on disk. None gives silence.
    A clip that cannot be decoded, or breaks the audio `limits`, is left out
    and listed in `skipped` (one bad file among thousands should not stop a
    training); the caller keeps its labels aligned through `kept`.
    """
    paths = list(paths)
    out = np.zeros((len(paths), desired_samples), dtype=np.int16)

    def load(item) -> SkippedClip | None:
        position, relative = item
        if relative is None:
            return None
        clip = decode_clip(data_dir, relative, sample_rate, desired_samples, limits)
        if isinstance(clip, SkippedClip):
            return clip
        out[position] = clip
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        items = list(enumerate(paths))
        results = list(tqdm(pool.map(load, items), total=len(items), desc="Loading clips", unit="clip",
                            leave=False, disable=len(items) < 200))
    skipped = tuple(result for result in results if result is not None)
    for clip in skipped:
        logger.warning("Skipped clip %s: %s", clip.path, clip.reason)
    if not skipped:
        return LoadedClips(audio=out, kept=np.arange(len(paths)), skipped=())
    kept = np.array([position for position, result in enumerate(results) if result is None], dtype=np.int64)
    return LoadedClips(audio=out[kept], kept=kept, skipped=skipped)


def fill_silence(audio: np.ndarray, silent_rows: np.ndarray, background: np.ndarray, seed: int) -> None:
    """Give the silence rows of an evaluation set fixed, seeded background noise
    at a random volume, as training makes its silence (a model never sees
    digital zeros there, so scoring on them would measure something else)."""
    if len(background) < audio.shape[1] or not len(silent_rows):
        return
    rng = np.random.default_rng(seed)
    for row in silent_rows:
        start = rng.integers(0, len(background) - audio.shape[1] + 1)
        volume = rng.uniform(0.0, 1.0)
        audio[row] = to_int16(background[start : start + audio.shape[1]] * volume)


def load_background(
    data_dir: Path,
    files: Sequence[str],
    sample_rate: int,
    min_samples: int,
    limits: Limits | AudioLimits | None = None,
) -> tuple[np.ndarray, tuple[SkippedClip, ...]]:
    """All noise files decoded and joined into one float32 array; a random
    window of it is mixed into training clips. Empty when there is none.

    Each file may last up to MAX_BACKGROUND_SECONDS (the other audio
    `limits` apply as to clips) and is decoded block by block; a file that
    cannot be used is skipped and returned with the reason.
    """
    bounds = limits if isinstance(limits, AudioLimits) else AudioLimits.from_limits(limits)
    bounds = bounds.with_max_seconds(MAX_BACKGROUND_SECONDS, "the bound on one background-noise file; cut it shorter")
    pieces, skipped = [], []
    for relative in files:
        try:
            samples = np.concatenate(list(iter_audio_blocks(data_dir / relative, sample_rate, bounds, name=relative)))
        except AudioError as exc:
            logger.warning("Skipped noise file %s: %s", relative, exc)
            skipped.append(SkippedClip(relative, str(exc)))
            continue
        if len(samples) < min_samples:
            logger.warning("Noise file %s is shorter than one clip; skipped", relative)
            continue
        pieces.append(samples)
    background = np.concatenate(pieces) if pieces else np.zeros((0,), dtype=np.float32)
    return background, tuple(skipped)
