"""Streaming evaluation: keywords found in long generated streams, as a user would meet them.

Clip accuracy says little about a detector listening for hours. Each training
therefore builds long streams from held-out clips (keywords and other words
every 2–4 s over background noise, as TF's generate_streaming_test_wav does),
noise-only audio and babble (dense, overlapping speech that is no keyword: a
detector calibrated on noise alone fires on voices it never heard), runs the
detector over them (detect.stream_scores once per stream, then detect.detect
at many thresholds) and scores the detections against the known words as TF's
test_streaming_accuracy does. The threshold that meets the configured false
accepts per hour on the validation streams is stored in the run and becomes
detection's default there.

Streams are rendered block by block, so their length costs time, not memory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from speechclas import data, detect

logger = logging.getLogger(__name__)

DET_CURVE_FILE = "det_curve.png"
# The silence between one clip's end and the next clip's start: for 1 s clips, a
# word every 2–4 s (TF's generate_streaming_test_wav: every 1–3 s).
WORD_GAP_S = (1.0, 3.0)
# Background noise is laid in segments, each crossfaded into the next (TF's values).
NOISE_SEGMENT_S = 1.0
NOISE_CROSSOVER_S = 0.5
# Clips fade in and out over this long, so their edges never click (TF: 500 samples at 16 kHz).
CLIP_RAMP_S = 0.03
BLOCK_SECONDS = 30.0
# Thresholds swept for the DET curve and the calibration.
THRESHOLDS = tuple(round(0.02 * step, 2) for step in range(5, 50))
SECONDS_PER_HOUR = 3600.0
# Babble: how many voices talk at once (drawn for each turn, inclusive), how long a
# turn lasts, the pause between one phrase's speech and the next in a voice, and
# the levels (dB of the clip as recorded) of the foreground talker (per phrase)
# and of the quieter ones (per turn).
BABBLE_VOICES = (1, 3)
BABBLE_TURN_S = (4.0, 12.0)
BABBLE_GAP_S = (0.0, 0.2)
BABBLE_FOREGROUND_DB = (-3.0, 0.0)
BABBLE_BACKGROUND_DB = (-20.0, -6.0)
# A clip's speech: its 10 ms frames within this many dB of its loudest one (the rest is padding).
SPEECH_FRAME_S = 0.01
SPEECH_FLOOR_DB = -30.0


@dataclasses.dataclass(frozen=True)
class StreamingSettings:
    """What the streaming evaluation of a training generates and aims at."""

    stream_seconds: float  # each word stream (validation, test); 0 disables the evaluation
    noise_seconds: float  # each noise-only stream
    babble_seconds: float  # each babble stream; 0: none
    background_volume: float  # largest noise volume under the words (the noise-only audio goes up to 1)
    time_tolerance_s: float  # how far a detection may be from its word
    target_false_accepts_per_hour: float
    seed: int

    @property
    def enabled(self) -> bool:
        return self.stream_seconds > 0


def settings_from_config(config) -> StreamingSettings:
    return StreamingSettings(
        stream_seconds=60.0 * config.streaming_minutes,
        noise_seconds=60.0 * config.streaming_noise_minutes,
        babble_seconds=60.0 * config.streaming_noise_minutes,  # as long as the noise: the same knob
        background_volume=config.background_volume,
        time_tolerance_s=config.detection_time_tolerance_ms / 1000.0,
        target_false_accepts_per_hour=config.target_false_accepts_per_hour,
        seed=config.random_seed,
    )


@dataclasses.dataclass(frozen=True)
class Word:
    """One clip of the ground truth: its label and where the clip lies in the stream."""

    label: str
    start_s: float
    end_s: float


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    """A long stream described by where its pieces go; `render` and `blocks` make the audio.

    Noise segment i starts at i * segment_stride in the stream, takes the
    background from noise_offsets[i] at noise_volumes[i] and fades over its
    first and last quarter-second into its neighbours. Clip clip_rows[j] of
    `clips` (int16) is added at clip_offsets[j] (sorted), times clip_gains[j]
    when there are gains; clips may overlap (babble), and overlapping ones add up.
    """

    sample_rate: int
    length: int
    background: np.ndarray
    noise_offsets: np.ndarray
    noise_volumes: np.ndarray
    clips: np.ndarray
    clip_rows: np.ndarray
    clip_offsets: np.ndarray
    words: tuple[Word, ...]
    clip_gains: np.ndarray | None = None  # None: every clip as recorded

    @property
    def duration_s(self) -> float:
        return self.length / self.sample_rate

    @property
    def segment_stride(self) -> int:
        return int(NOISE_SEGMENT_S * self.sample_rate)

    @property
    def segment_length(self) -> int:
        return int((NOISE_SEGMENT_S + NOISE_CROSSOVER_S) * self.sample_rate)

    def render(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of the stream, float32 in [-1, 1]."""
        stop = min(stop, self.length)
        out = np.zeros(max(stop - start, 0), np.float32)
        if len(self.noise_offsets):
            stride, length = self.segment_stride, self.segment_length
            envelope = _envelope(length, int(NOISE_CROSSOVER_S / 2 * self.sample_rate))
            first = max(0, (start - length) // stride + 1)
            last = min(len(self.noise_offsets), (stop - 1) // stride + 1)
            for segment in range(first, last):
                begin = segment * stride
                low, high = max(start, begin), min(stop, begin + length)
                source = self.noise_offsets[segment] + low - begin
                out[low - start : high - start] += (
                    self.background[source : source + high - low] * envelope[low - begin : high - begin]
                    * self.noise_volumes[segment]
                )
        clip_length = self.clips.shape[1] if self.clips.ndim == 2 else 0
        if len(self.clip_offsets):
            envelope = _envelope(clip_length, int(CLIP_RAMP_S * self.sample_rate))
            first = np.searchsorted(self.clip_offsets, start - clip_length, side="right")
            last = np.searchsorted(self.clip_offsets, stop, side="left")
            for index in range(first, last):
                row, begin = self.clip_rows[index], self.clip_offsets[index]
                low, high = max(start, begin), min(stop, begin + clip_length)
                clip = self.clips[row, low - begin : high - begin].astype(np.float32) / 32768.0
                if self.clip_gains is not None:
                    clip *= self.clip_gains[index]
                out[low - start : high - start] += clip * envelope[low - begin : high - begin]
        return np.clip(out, -1.0, 1.0, out=out)

    def blocks(self, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
        """The whole stream, block after block (never all of it in memory)."""
        block = max(1, int(block_seconds * self.sample_rate))
        for start in range(0, self.length, block):
            yield self.render(start, start + block)


def _envelope(length: int, ramp: int) -> np.ndarray:
    """1 in the middle, rising over the first `ramp` samples and falling over the last."""
    envelope = np.ones(length, np.float32)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rising = np.arange(ramp, dtype=np.float32) / ramp
        envelope[:ramp] = rising
        envelope[length - ramp :] = rising[::-1]
    return envelope


def _noise_plan(background: np.ndarray, sample_rate: int, length: int, max_volume: float, rng: np.random.Generator):
    """Offsets into `background` and volumes of the noise segments covering `length` samples."""
    segment_length = int((NOISE_SEGMENT_S + NOISE_CROSSOVER_S) * sample_rate)
    if len(background) < segment_length or max_volume <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    count = -(-length // int(NOISE_SEGMENT_S * sample_rate))
    offsets = rng.integers(0, len(background) - segment_length + 1, size=count)
    volumes = rng.uniform(0.0, max_volume, size=count).astype(np.float32)
    return offsets, volumes


def word_stream(
    clips: np.ndarray,
    clip_labels: Sequence[str],
    background: np.ndarray,
    sample_rate: int,
    seconds: float,
    background_volume: float,
    seed: int,
) -> Stream:
    """Clips (int16 [n, samples]) one after the other with 1–3 s between them (a word
    every 2–4 s for 1 s clips) over background noise at up to `background_volume`,
    in a seeded order that uses every clip once before any twice."""
    rng = np.random.default_rng(seed)
    length = int(seconds * sample_rate)
    clip_length = clips.shape[1]
    offsets, rows = [], []
    order: list[int] = []
    position = rng.uniform(*WORD_GAP_S) * sample_rate
    while len(clips) and position + clip_length <= length:
        if not order:
            order = list(rng.permutation(len(clips)))
        rows.append(order.pop())
        offsets.append(int(position))
        position += clip_length + rng.uniform(*WORD_GAP_S) * sample_rate
    words = tuple(
        Word(clip_labels[row], offset / sample_rate, (offset + clip_length) / sample_rate)
        for row, offset in zip(rows, offsets, strict=True)
    )
    noise_offsets, noise_volumes = _noise_plan(background, sample_rate, length, background_volume, rng)
    return Stream(
        sample_rate=sample_rate, length=length, background=background,
        noise_offsets=noise_offsets, noise_volumes=noise_volumes, clips=clips,
        clip_rows=np.array(rows, np.int64), clip_offsets=np.array(offsets, np.int64), words=words,
    )


def noise_stream(background: np.ndarray, sample_rate: int, seconds: float, seed: int) -> Stream:
    """Background noise only, each second at a random volume up to full scale (as the
    silence a model trains on), for false accepts per hour."""
    rng = np.random.default_rng(seed)
    length = int(seconds * sample_rate)
    noise_offsets, noise_volumes = _noise_plan(background, sample_rate, length, 1.0, rng)
    return Stream(
        sample_rate=sample_rate, length=length, background=background,
        noise_offsets=noise_offsets, noise_volumes=noise_volumes, clips=np.zeros((0, 0), np.int16),
        clip_rows=np.zeros(0, np.int64), clip_offsets=np.zeros(0, np.int64), words=(),
    )


def _speech_extents(clips: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each clip's speech starts and ends (samples): its first and last 10 ms frame within
    SPEECH_FLOOR_DB of its loudest, so babble lays speech after speech, not padding after padding.
    A silent clip gets an empty extent (start == end)."""
    count, length = clips.shape if clips.ndim == 2 else (0, 0)
    frame = max(1, int(SPEECH_FRAME_S * sample_rate))
    frames = length // frame
    starts, ends = np.zeros(count, np.int64), np.zeros(count, np.int64)
    if not frames:
        return starts, ends
    for first in range(0, count, 256):  # a few MB at a time
        chunk = clips[first : first + 256, : frames * frame].astype(np.float32).reshape(-1, frames, frame)
        energy = np.mean(np.square(chunk), axis=2)
        loud = (energy >= energy.max(axis=1, keepdims=True) * 10.0 ** (SPEECH_FLOOR_DB / 10.0)) & (energy > 0)
        has_speech = loud.any(axis=1)
        rows = np.arange(first, first + len(chunk))
        starts[rows] = np.where(has_speech, np.argmax(loud, axis=1) * frame, 0)
        ends[rows] = np.where(has_speech, (frames - np.argmax(loud[:, ::-1], axis=1)) * frame, 0)
    return starts, ends


def _talking_spans(bounds: Sequence[int], talks: np.ndarray) -> list[tuple[int, int]]:
    """(begin, end) of each run of consecutive turns (turn i: bounds[i] to bounds[i + 1]) in which a
    voice talks: it talks on across a turn's end, and pauses only where it stops."""
    spans: list[tuple[int, int]] = []
    for turn in np.flatnonzero(talks):
        if spans and spans[-1][1] == bounds[turn]:
            spans[-1] = (spans[-1][0], bounds[turn + 1])
        else:
            spans.append((bounds[turn], bounds[turn + 1]))
    return spans


def babble_stream(
    clips: np.ndarray,
    background: np.ndarray,
    sample_rate: int,
    seconds: float,
    seed: int,
    voices: tuple[int, int] = BABBLE_VOICES,
    noise_volume: float = 1.0,
) -> Stream:
    """Speech that is no keyword, for false accepts per hour: clips (int16 [n, samples], words
    or phrases, each at the stream's rate) laid densely in overlapping voices over background
    noise at random volume up to `noise_volume` (full scale, as noise_stream). It has no words:
    every detection on it is a false accept.

    The stream is cut in turns of 4–12 s; in each, between voices[0] and voices[1] voices
    (inclusive) talk at once: the first, the foreground, always, each phrase 0–3 dB under its
    recorded level; the others 6–20 dB under it (a level per turn). In a voice each phrase's
    speech starts 0–0.2 s after the previous one's ends (the clips' padding overlaps), in a
    seeded order that uses every clip once before any twice.
    """
    low, high = voices
    if not 1 <= low <= high:
        raise ValueError(f"voices must be (low, high) with 1 <= low <= high, got {voices}")
    rng = np.random.default_rng(seed)
    length = int(seconds * sample_rate)
    clip_length = clips.shape[1] if clips.ndim == 2 else 0
    speech_starts, speech_ends = _speech_extents(clips, sample_rate)
    usable = np.flatnonzero(speech_ends > speech_starts)
    bounds = [0]
    while bounds[-1] < length:
        bounds.append(min(length, bounds[-1] + int(rng.uniform(*BABBLE_TURN_S) * sample_rate)))
    turn_begins = np.array(bounds[:-1], np.int64)
    talking = rng.integers(low, high + 1, size=len(turn_begins))  # voices in each turn
    levels = rng.uniform(*BABBLE_BACKGROUND_DB, size=(len(turn_begins), high))  # dB of each voice in each turn
    rows, offsets, gains_db = [], [], []
    if len(usable) and 0 < clip_length <= length:
        for voice in range(high):
            order: list[int] = []
            spoken = 0  # where this voice's last speech ended
            for begin, end in _talking_spans(bounds, talking > voice):
                spoken = max(spoken, begin)
                while True:
                    if not order:
                        order = list(rng.permutation(usable))
                    row = order[-1]
                    offset = max(0, spoken + int(rng.uniform(*BABBLE_GAP_S) * sample_rate) - int(speech_starts[row]))
                    if offset + speech_starts[row] >= end or offset + clip_length > length:
                        break
                    order.pop()
                    turn = int(np.searchsorted(turn_begins, offset + speech_starts[row], side="right")) - 1
                    rows.append(row)
                    offsets.append(offset)
                    gains_db.append(rng.uniform(*BABBLE_FOREGROUND_DB) if voice == 0 else levels[turn, voice])
                    spoken = offset + int(speech_ends[row])
    placed = np.argsort(np.array(offsets, np.int64), kind="stable")
    noise_offsets, noise_volumes = _noise_plan(background, sample_rate, length, noise_volume, rng)
    return Stream(
        sample_rate=sample_rate, length=length, background=background,
        noise_offsets=noise_offsets, noise_volumes=noise_volumes, clips=clips,
        clip_rows=np.array(rows, np.int64)[placed], clip_offsets=np.array(offsets, np.int64)[placed], words=(),
        clip_gains=(10.0 ** (np.array(gains_db, np.float64) / 20.0)).astype(np.float32)[placed],
    )


@dataclasses.dataclass(frozen=True)
class StreamCounts:
    """TF's StreamingAccuracyStats, with the keywords told apart from the other words.

    The detector never reports `_unknown_`, so the other words are in the
    stream to tempt it: a detection on one is wrong, never correct.
    """

    keywords: int  # keywords in the ground truth
    other_words: int  # `_unknown_` words in the ground truth
    matched: int  # keywords with a detection within the tolerance, of any label
    correct: int  # detections on an unmatched keyword of their label
    wrong: int  # detections on a word of another label, or on one already matched
    false_positives: int  # detections near no word

    @property
    def false_accepts(self) -> int:
        return self.wrong + self.false_positives


def count_matches(words: Sequence[Word], detections: Sequence[detect.Detection], tolerance_s: float) -> StreamCounts:
    """Match detections to words as TF's CalculateAccuracyStats does.

    Each detection, in order, takes the first word (by time) whose start lies
    within `tolerance_s` of its own start: correct if the labels agree and the
    word was not matched before, wrong otherwise; the word is then matched.
    A detection with no word within the tolerance is a false positive.
    """
    words = sorted(words, key=lambda word: word.start_s)
    starts = np.array([word.start_s for word in words])
    matched: set[int] = set()
    correct = wrong = false_positives = 0
    for detection in detections:
        first = int(np.searchsorted(starts, detection.start_s - tolerance_s, side="left"))
        if first < len(words) and words[first].start_s <= detection.start_s + tolerance_s:
            if words[first].label == detection.label and first not in matched:
                correct += 1
            else:
                wrong += 1
            matched.add(first)
        else:
            false_positives += 1
    is_keyword = [word.label != data.UNKNOWN_LABEL for word in words]
    return StreamCounts(
        keywords=sum(is_keyword),
        other_words=len(words) - sum(is_keyword),
        matched=sum(1 for index in matched if is_keyword[index]),
        correct=correct,
        wrong=wrong,
        false_positives=false_positives,
    )


def stream_metrics(
    counts: StreamCounts, stream_seconds: float, noise_detections: int, noise_seconds: float,
    babble_detections: int = 0, babble_seconds: float = 0.0,
) -> dict:
    """The figures of one threshold: TF's percentages (of the keywords), the
    false-reject rate, and false accepts per hour of all the audio (the word
    stream's wrong detections and false positives, every detection on the noise
    and on the babble), of the noise-only audio and of the babble."""
    keywords = counts.keywords

    def percentage(count: int) -> float | None:
        return round(100.0 * count / keywords, 2) if keywords else None

    def per_hour(detections: int, seconds: float) -> float | None:
        return round(detections * SECONDS_PER_HOUR / seconds, 2) if seconds else None

    total_hours = (stream_seconds + noise_seconds + babble_seconds) / SECONDS_PER_HOUR
    return {
        "matched_percentage": percentage(counts.matched),
        "correct_percentage": percentage(counts.correct),
        "wrong_percentage": percentage(counts.wrong),
        "false_positive_percentage": percentage(counts.false_positives),
        "false_reject_rate": round(1.0 - counts.correct / keywords, 4) if keywords else None,
        "false_accepts_per_hour": round((counts.false_accepts + noise_detections + babble_detections) / total_hours, 2)
        if total_hours else None,
        "noise_false_accepts_per_hour": per_hour(noise_detections, noise_seconds),
        "babble_false_accepts_per_hour": per_hour(babble_detections, babble_seconds),
        **dataclasses.asdict(counts),
        "noise_detections": noise_detections,
        "babble_detections": babble_detections,
        "stream_minutes": round(stream_seconds / 60.0, 2),
        "noise_minutes": round(noise_seconds / 60.0, 2),
        "babble_minutes": round(babble_seconds / 60.0, 2),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class ScoredStreams:
    """A split's word stream, noise-only stream and babble with the model's scores over them, computed once."""

    words: tuple[Word, ...]
    stream_seconds: float
    stream_scores: tuple[np.ndarray, np.ndarray]  # (times_s, probabilities)
    noise_seconds: float
    noise_scores: tuple[np.ndarray, np.ndarray] | None
    babble_seconds: float = 0.0
    babble_scores: tuple[np.ndarray, np.ndarray] | None = None

    def metrics(self, labels: Sequence[str], settings: detect.DetectSettings, tolerance_s: float) -> dict:
        """The figures of the detections at `settings` (its threshold)."""
        found = detect.detect(*self.stream_scores, labels, settings)
        noise_found = detect.detect(*self.noise_scores, labels, settings) if self.noise_scores else []
        babble_found = detect.detect(*self.babble_scores, labels, settings) if self.babble_scores else []
        counts = count_matches(self.words, found, tolerance_s)
        return stream_metrics(counts, self.stream_seconds, len(noise_found), self.noise_seconds,
                              len(babble_found), self.babble_seconds)


def score_streams(
    scorer, word: Stream, noise: Stream | None, settings: detect.DetectSettings, babble: Stream | None = None,
) -> ScoredStreams:
    """Run the model over the streams once (the thresholds are applied later)."""
    return ScoredStreams(
        words=word.words,
        stream_seconds=word.duration_s,
        stream_scores=detect.stream_scores(scorer, word.blocks(), settings),
        noise_seconds=noise.duration_s if noise else 0.0,
        noise_scores=detect.stream_scores(scorer, noise.blocks(), settings) if noise else None,
        babble_seconds=babble.duration_s if babble else 0.0,
        babble_scores=detect.stream_scores(scorer, babble.blocks(), settings) if babble else None,
    )


def sweep(
    scored: ScoredStreams, labels: Sequence[str], settings: detect.DetectSettings, tolerance_s: float,
    thresholds: Sequence[float] = THRESHOLDS,
) -> list[dict]:
    """False-reject rate and false accepts per hour at each threshold: the DET curve."""
    rows = []
    for threshold in thresholds:
        figures = scored.metrics(labels, dataclasses.replace(settings, threshold=threshold), tolerance_s)
        rows.append({"threshold": threshold, "false_reject_rate": figures["false_reject_rate"],
                     "false_accepts_per_hour": figures["false_accepts_per_hour"]})
    return rows


def calibration_limit(target_false_accepts_per_hour: float, hours: float) -> float:
    """The false accepts per hour the validation streams may show: the target, or one false accept
    in all of their audio when they are too short to tell the target (12 minutes cannot tell 1 an
    hour from 0): else one unlucky word decides, and the threshold that removes it misses most keywords."""
    if hours <= 0:
        return target_false_accepts_per_hour
    return max(target_false_accepts_per_hour, round(1.0 / hours, 2))


def choose_threshold(curve: Sequence[dict], target_false_accepts_per_hour: float) -> float:
    """The lowest threshold whose false accepts per hour meet the target (the most
    keywords found within it); the highest threshold when none does."""
    meeting = [row["threshold"] for row in curve if row["false_accepts_per_hour"] <= target_false_accepts_per_hour]
    return min(meeting) if meeting else max(row["threshold"] for row in curve)


def save_det_curve(curves: dict[str, Sequence[dict]], threshold: float, target: float, path: Path, title: str = "") -> None:
    """False-reject rate against false accepts per hour, one line per split, the chosen threshold marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        points = [(row["false_accepts_per_hour"], row["false_reject_rate"]) for row in curve
                  if row["false_reject_rate"] is not None]
        if not points:
            continue
        line, = axes.plot(*zip(*points, strict=True), marker=".", label=name)
        chosen = [(row["false_accepts_per_hour"], row["false_reject_rate"]) for row in curve
                  if row["threshold"] == threshold and row["false_reject_rate"] is not None]
        if chosen:
            axes.plot(*chosen[0], marker="o", markersize=9, fillstyle="none", color=line.get_color())
    axes.axvline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g} FA/h")
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlim(left=0)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("false accepts per hour")
    axes.set_ylabel("false-reject rate")
    axes.set_title(title or f"DET curve (circled: threshold {threshold:g})")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def split_streams(
    clips: np.ndarray, clip_labels: np.ndarray, labels: Sequence[str], background: np.ndarray, sample_rate: int,
    settings: StreamingSettings, seed: int,
) -> tuple[Stream, Stream | None]:
    """The word stream of one split's clips (its silence rows left out) and a noise-only stream."""
    keep = [row for row, label in enumerate(clip_labels) if labels[label] != data.SILENCE_LABEL]
    words = word_stream(clips[keep], [labels[clip_labels[row]] for row in keep], background, sample_rate,
                        settings.stream_seconds, settings.background_volume, seed)
    has_noise = settings.noise_seconds > 0 and len(background) >= int(
        (NOISE_SEGMENT_S + NOISE_CROSSOVER_S) * sample_rate)
    noise = noise_stream(background, sample_rate, settings.noise_seconds, seed + 1) if has_noise else None
    return words, noise


def split_babble(
    clips: np.ndarray, clip_labels: np.ndarray, labels: Sequence[str], background: np.ndarray, sample_rate: int,
    settings: StreamingSettings, seed: int, given: np.ndarray | None = None,
) -> tuple[Stream | None, str | None, int]:
    """One split's babble stream, where its speech came from ("given", or "_unknown_": the
    split's own `_unknown_` clips when no clips are given, so every training gets babble)
    and how many clips it drew on; (None, None, 0) when it has no length or no clips."""
    if given is not None and len(given):
        source, babble_clips = "given", given
    else:
        source, babble_clips = data.UNKNOWN_LABEL, clips[
            [row for row, label in enumerate(clip_labels) if labels[label] == data.UNKNOWN_LABEL]]
    if settings.babble_seconds <= 0 or not len(babble_clips):
        return None, None, 0
    stream = babble_stream(babble_clips, background, sample_rate, settings.babble_seconds, seed)
    return stream, source, len(babble_clips)


def evaluate(
    scorer,
    labels: Sequence[str],
    evaluation: dict[str, tuple[np.ndarray, np.ndarray]],
    background: np.ndarray,
    sample_rate: int,
    settings: StreamingSettings,
    detect_settings: detect.DetectSettings,
    det_curve_path: Path,
    babble: dict[str, np.ndarray] | None = None,
) -> dict:
    """The streaming figures of a trained model, for metrics.json's `streaming`.

    `evaluation` maps a split to its clips (int16 [n, samples]) and label
    indices, as training holds them; `babble` may map a split to clips of
    speech that is no keyword (int16 [n, samples] at `sample_rate`) for its
    babble stream, which is otherwise made of the split's `_unknown_` clips.
    The validation streams choose the threshold, the test streams report what
    it gives. Writes the DET curve.
    """
    started = time.monotonic()
    scored, babble_sources = {}, {}
    for number, split in enumerate(("validation", "testing")):
        clips, clip_labels = evaluation[split]
        seed = settings.seed + 10 * number
        words, noise = split_streams(clips, clip_labels, labels, background, sample_rate, settings, seed)
        babble_audio, source, babble_count = split_babble(clips, clip_labels, labels, background, sample_rate,
                                                          settings, seed + 2, (babble or {}).get(split))
        babble_sources["test" if split == "testing" else split] = {"source": source, "clips": babble_count}
        scored[split] = score_streams(scorer, words, noise, detect_settings, babble_audio)
        logger.info("Streaming evaluation: scored the %s streams (%d words in %.0f s, %.0f s of noise, "
                    "%.0f s of babble from %d %s clips)", split, len(words.words), words.duration_s,
                    noise.duration_s if noise else 0.0, babble_audio.duration_s if babble_audio else 0.0,
                    babble_count, source or "no")
    tolerance = settings.time_tolerance_s
    curves = {split: sweep(streams, labels, detect_settings, tolerance) for split, streams in scored.items()}
    target = settings.target_false_accepts_per_hour
    validation = scored["validation"]
    hours = (validation.stream_seconds + validation.noise_seconds + validation.babble_seconds) / SECONDS_PER_HOUR
    limit = calibration_limit(target, hours)
    if limit > target:
        logger.warning("Streaming evaluation: %.0f minutes of validation audio cannot tell %g false accepts per hour; "
                       "the threshold allows one false accept in them (%g per hour): lengthen streaming_minutes and "
                       "streaming_noise_minutes for a finer calibration", 60 * hours, target, limit)
    threshold = choose_threshold(curves["validation"], limit)
    chosen = dataclasses.replace(detect_settings, threshold=threshold)
    results = {
        "threshold": threshold,
        "target_false_accepts_per_hour": target,
        "calibrated_false_accepts_per_hour": limit,
        "time_tolerance_ms": round(tolerance * 1000.0, 1),
        "detect_settings": dataclasses.asdict(chosen),
        "test": scored["testing"].metrics(labels, chosen, tolerance),
        "validation": scored["validation"].metrics(labels, chosen, tolerance),
        "det_curve": [
            {"threshold": test_row["threshold"],
             "test": {key: test_row[key] for key in ("false_reject_rate", "false_accepts_per_hour")},
             "validation": {key: validation_row[key] for key in ("false_reject_rate", "false_accepts_per_hour")}}
            for test_row, validation_row in zip(curves["testing"], curves["validation"], strict=True)
        ],
        "babble": babble_sources,
        "duration_s": round(time.monotonic() - started, 1),
    }
    save_det_curve({"validation": curves["validation"], "test": curves["testing"]}, threshold, target,
                   det_curve_path)
    test = results["test"]
    logger.info("Streaming test at threshold %.2f (chosen for %g false accepts/h on validation): %s%% correct, "
                "%s%% wrong, %s%% false positives, false-reject rate %s, %s false accepts/h (%s on noise, "
                "%s on babble; %.1f s)", threshold, limit, test["correct_percentage"], test["wrong_percentage"],
                test["false_positive_percentage"], test["false_reject_rate"], test["false_accepts_per_hour"],
                test["noise_false_accepts_per_hour"], test["babble_false_accepts_per_hour"], results["duration_s"])
    return results


def evaluate_trained_model(
    model, feature_settings, labels: Sequence[str], evaluation: dict[str, tuple[np.ndarray, np.ndarray]],
    background: np.ndarray, config, stats_dir: Path, babble: dict[str, np.ndarray] | None = None,
) -> dict | None:
    """metrics.json's `streaming` for the Keras model a training just made, with detection's
    default settings; None when the configuration turns the evaluation off. `babble`: as evaluate's."""
    settings = settings_from_config(config)
    if not settings.enabled:
        return None
    return evaluate(
        detect.keras_scorer(model, feature_settings, labels), labels, evaluation, background,
        feature_settings.sample_rate, settings, detect.DetectSettings.for_features(feature_settings),
        stats_dir / DET_CURVE_FILE, babble,
    )
