"""Decoding audio files into mono float waveforms at the model's rate.

Training and prediction share this decoder, so a clip is turned into
samples the same way in both. libsndfile (through soundfile) reads
8/16/24/32-bit PCM and float wav, flac, ogg and mp3; soxr resamples.

A file is judged by its header before any sample is decoded (sample rate,
channels, duration against the operator's `Limits`), then decoded in
blocks and resampled with soxr's streaming resampler, so the memory a file
takes is one block plus the output, however much the file claims to hold:
a few KB can announce hours of audio (1 Hz, many channels, a data chunk of
4 GB). `iter_audio_blocks` gives the blocks one by one for long audio;
`decode_audio` joins them for one clip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from speechclas.limits import Limits, setting

logger = logging.getLogger(__name__)

AudioSource = str | Path | bytes | BinaryIO
DEFAULT_BLOCK_SECONDS = 4.0
# Samples (frames x channels) decoded at once, whatever block_seconds asks: 2 MB of float32.
MAX_BLOCK_VALUES = 2**19
# libsndfile's frame count when a header does not say (flac or ogg streams without a total).
_UNKNOWN_FRAMES = 2**62
# A wav's chunk list is walked to find its data chunk; real files have a handful of chunks.
_MAX_WAV_CHUNKS = 1000


class AudioError(ValueError):
    """An input that is not usable audio, with a message a person can act on."""


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, at `sample_rate`
    sample_rate: int
    original_sample_rate: int
    original_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclasses.dataclass(frozen=True)
class AudioHeader:
    """What a file says about itself before decoding; `frames` is None when it does not say."""

    sample_rate: int
    channels: int
    frames: int | None
    format: str

    @property
    def duration_s(self) -> float | None:
        return None if self.frames is None else self.frames / self.sample_rate


@dataclasses.dataclass(frozen=True)
class AudioLimits:
    """The bounds one decoding checks; the duration bound says what sets it, for the refusal."""

    max_seconds: float
    max_channels: int
    min_sample_rate: int
    max_sample_rate: int
    max_seconds_setting: str

    @classmethod
    def from_limits(cls, limits: Limits | None = None) -> AudioLimits:
        """The operator's bounds (their defaults when None)."""
        limits = limits if limits is not None else Limits.defaults()
        return cls(
            max_seconds=float(limits.max_audio_seconds),
            max_channels=limits.max_channels,
            min_sample_rate=limits.min_sample_rate,
            max_sample_rate=limits.max_sample_rate,
            max_seconds_setting=f"operator setting {setting('max_audio_seconds').env}",
        )

    def with_max_seconds(self, max_seconds: float, max_seconds_setting: str | None = None) -> AudioLimits:
        """Another duration bound, for audio that is long by design (noise files, hours to scan);
        `max_seconds_setting` says in refusals what sets it."""
        return dataclasses.replace(
            self, max_seconds=float(max_seconds), max_seconds_setting=max_seconds_setting or "the bound for this audio"
        )


def _check_wav_not_truncated(stream: BinaryIO, size: int, name: str) -> None:
    """libsndfile silently reads what is there; a wav whose data chunk is
    shorter than its header promises is a truncated upload, so refuse it.
    Only the chunk headers are read: the walk seeks over the chunks."""
    stream.seek(0)
    head = stream.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    position = 12
    for _ in range(_MAX_WAV_CHUNKS):
        if position + 8 > size:
            return
        stream.seek(position)
        chunk = stream.read(8)
        if len(chunk) < 8:
            return
        chunk_id, (chunk_size,) = chunk[:4], struct.unpack("<I", chunk[4:])
        if chunk_id == b"data":
            available = size - position - 8
            # 0 and 0xFFFFFFFF mark streamed wavs whose size was never filled in.
            if chunk_size not in (0, 0xFFFFFFFF) and available < chunk_size:
                raise AudioError(
                    f"{name} is a truncated wav file: its header announces {chunk_size} bytes "
                    f"of audio but only {available} are present"
                )
            return
        position += 8 + chunk_size + (chunk_size % 2)


def _libsndfile_reason(exc: Exception) -> str:
    # libsndfile names the stream ("<_io.BytesIO object at 0x...>"); keep its reason only.
    return re.sub(r"Error opening <[^>]*>: ?", "", str(exc)).strip() or "unknown format"


@contextlib.contextmanager
def _binary_stream(source: AudioSource, name: str | None) -> Iterator[tuple[BinaryIO, str]]:
    """A seekable binary stream over a path, bytes or an open file (read from its start),
    and the name messages use."""
    if isinstance(source, (str, Path)):
        name = name or str(source)
        try:
            stream = open(source, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise AudioError(f"cannot read {name}: {exc.strerror}") from exc
        with stream:
            yield stream, name
    elif isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source), name or "the audio file"
    else:
        yield source, name or "the audio file"


def _check_header(header: AudioHeader, limits: AudioLimits, name: str) -> None:
    if not limits.min_sample_rate <= header.sample_rate <= limits.max_sample_rate:
        raise AudioError(
            f"{name} has a sample rate of {header.sample_rate} Hz in its header; accepted are "
            f"{limits.min_sample_rate} to {limits.max_sample_rate} Hz (operator settings "
            f"{setting('min_sample_rate').env}, {setting('max_sample_rate').env})"
        )
    if header.channels > limits.max_channels:
        raise AudioError(
            f"{name} has {header.channels} channels; at most {limits.max_channels} are accepted "
            f"(operator setting {setting('max_channels').env})"
        )
    if header.frames == 0:
        raise AudioError(f"{name} holds no audio samples")
    if header.duration_s is not None and header.duration_s > limits.max_seconds:
        raise AudioError(
            f"{name} lasts {header.duration_s:.1f} s according to its header; the longest accepted is "
            f"{limits.max_seconds:g} s ({limits.max_seconds_setting})"
        )


@contextlib.contextmanager
def open_audio(
    source: AudioSource, name: str | None = None, limits: Limits | AudioLimits | None = None
) -> Iterator[AudioReader]:
    """Open a file and check its header against `limits`; nothing is decoded yet.

    Raises AudioError (empty, not audio, truncated wav, rate, channels or
    duration out of bounds) with a message naming the file and the bound.
    """
    bounds = limits if isinstance(limits, AudioLimits) else AudioLimits.from_limits(limits)
    with _binary_stream(source, name) as (stream, name):
        size = stream.seek(0, os.SEEK_END)
        if size <= 0:
            raise AudioError(f"{name} is empty")
        _check_wav_not_truncated(stream, size, name)
        stream.seek(0)
        try:
            sound = _SequentialSoundFile(stream)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise AudioError(
                f"{name} is not a readable audio file (wav, flac or ogg expected): {_libsndfile_reason(exc)}"
            ) from exc
        with sound:
            header = AudioHeader(
                sample_rate=int(sound.samplerate),
                channels=int(sound.channels),
                frames=None if sound.frames >= _UNKNOWN_FRAMES else int(sound.frames),
                format=str(sound.format),
            )
            _check_header(header, bounds, name)
            yield AudioReader(sound, header, bounds, name)


class _SequentialSoundFile(soundfile.SoundFile):
    """A SoundFile read front to back only. soundfile seeks to its own position after every
    read of a seekable file; for a FLAC whose header gives no length that seek fails at the
    end of the stream, and it costs a decoder seek per block. libsndfile keeps the position."""

    def seekable(self) -> bool:
        return False


class AudioReader:
    """An opened file whose header passed the checks (see `open_audio`): decodes it block by block."""

    def __init__(self, sound: soundfile.SoundFile, header: AudioHeader, limits: AudioLimits, name: str):
        self._sound = sound
        self.header = header
        self.limits = limits
        self.name = name

    def mono_blocks(self, block_seconds: float = DEFAULT_BLOCK_SECONDS) -> Iterator[np.ndarray]:
        """Float32 mono blocks at the file's own rate, in [-1, 1].

        Stops with an AudioError at a sample that is not a finite number, or
        once more audio is decoded than the duration bound allows (a header
        that did not say, or said less).
        """
        rate, channels = self.header.sample_rate, self.header.channels
        block_frames = max(1, min(int(block_seconds * rate), MAX_BLOCK_VALUES // channels))
        max_frames = int(self.limits.max_seconds * rate)
        buffer = np.empty((block_frames, channels), np.float32)  # reused: one block in memory
        decoded = clipped = 0
        while True:
            try:
                block = self._sound.read(min(block_frames, max_frames + 1 - decoded), out=buffer)
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                raise AudioError(f"{self.name} cannot be decoded: {_libsndfile_reason(exc)}") from exc
            if not len(block):
                break
            decoded += len(block)
            if decoded > max_frames:
                announced = "no duration" if self.header.frames is None else f"{self.header.duration_s:.1f} s"
                raise AudioError(
                    f"{self.name} holds more than {self.limits.max_seconds:g} s of audio although its header "
                    f"announces {announced}; the longest accepted is {self.limits.max_seconds:g} s "
                    f"({self.limits.max_seconds_setting})"
                )
            if not np.isfinite(block).all():
                raise AudioError(f"{self.name} holds samples that are not finite numbers (NaN or infinity)")
            # Float files may hold any value; PCM never leaves [-1, 1).
            out_of_range = int(np.count_nonzero(np.abs(block) > 1.0))
            if out_of_range:
                clipped += out_of_range
                np.clip(block, -1.0, 1.0, out=block)
            yield block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0].copy()
        if not decoded:
            raise AudioError(f"{self.name} holds no audio samples")
        if clipped:
            logger.info("%s: %d samples outside [-1, 1] clipped", self.name, clipped)

    def blocks(self, sample_rate: int, block_seconds: float = DEFAULT_BLOCK_SECONDS) -> Iterator[np.ndarray]:
        """Float32 mono blocks at `sample_rate` (soxr's streaming resampler), in [-1, 1].

        Block lengths vary (the resampler holds back a filter's length at the
        start and gives it at the end); only their concatenation is the signal.
        """
        if self.header.sample_rate == sample_rate:
            yield from self.mono_blocks(block_seconds)
            return
        resampler = soxr.ResampleStream(self.header.sample_rate, sample_rate, 1, dtype="float32", quality="HQ")
        for mono in self.mono_blocks(block_seconds):
            out = resampler.resample_chunk(mono)
            if len(out):
                yield np.clip(out, -1.0, 1.0, out=out)
        out = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if len(out):
            yield np.clip(out, -1.0, 1.0, out=out)


def iter_audio_blocks(
    source: AudioSource,
    sample_rate: int,
    limits: Limits | AudioLimits | None = None,
    *,
    name: str | None = None,
    max_seconds: float | None = None,
    max_seconds_setting: str | None = None,
    block_seconds: float = DEFAULT_BLOCK_SECONDS,
) -> Iterator[np.ndarray]:
    """Mono float32 blocks of any long audio at `sample_rate`, in bounded memory.

    `max_seconds` replaces the operator's SPEECHCLAS_MAX_AUDIO_SECONDS for
    audio that is long by design (hours to scan), and `max_seconds_setting`
    is what a refusal names as that bound. Raises AudioError as `open_audio`,
    and while decoding as `AudioReader.mono_blocks`.
    """
    if not isinstance(limits, AudioLimits):
        limits = AudioLimits.from_limits(limits)
    if max_seconds is not None:
        limits = limits.with_max_seconds(max_seconds, max_seconds_setting)
    with open_audio(source, name, limits) as reader:
        yield from reader.blocks(sample_rate, block_seconds)


def decode_audio(
    source: AudioSource, sample_rate: int, name: str | None = None, *, limits: Limits | AudioLimits | None = None
) -> DecodedAudio:
    """Read any file libsndfile knows, within `limits` (default: the operator
    defaults), mix to mono and resample to `sample_rate`."""
    with open_audio(source, name, limits) as reader:
        blocks = list(reader.blocks(sample_rate))
        header = reader.header
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return DecodedAudio(
        samples=samples.astype(np.float32, copy=False),
        sample_rate=sample_rate,
        original_sample_rate=header.sample_rate,
        original_channels=header.channels,
    )


def fix_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Pad with zeros at the end, or cut the end, to exactly `length` samples
    (what TF's decode_wav does with desired_samples)."""
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


def place_in_window(samples: np.ndarray, length: int) -> tuple[np.ndarray, int, str]:
    """The one placement of a clip in the model window, for training and prediction alike.

    Shorter clips are centred (word-length clips then sit where 1 s
    speech_commands clips have their word), longer ones give their loudest
    window. Answers the window, the start sample of the clip's audio in it
    (negative: padding in front) and how it was chosen.
    """
    if len(samples) == length:
        return samples, 0, "whole"
    if len(samples) < length:
        missing = length - len(samples)
        before = missing // 2
        return np.pad(samples, (before, missing - before)), -before, "padded"
    window, start = loudest_window(samples, length, hop=max(1, length // 100))
    return window, start, "loudest"


def loudest_window(samples: np.ndarray, length: int, hop: int) -> tuple[np.ndarray, int]:
    """The `length`-sample window with the most energy, searched every `hop`
    samples; keyword clips longer than the model window are scored there.
    Returns the window and its start sample."""
    if len(samples) <= length:
        return fix_length(samples, length), 0
    energy = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    starts = np.arange(0, len(samples) - length + 1, max(1, hop))
    if starts[-1] != len(samples) - length:
        starts = np.append(starts, len(samples) - length)
    window_energy = energy[starts + length] - energy[starts]
    best = int(starts[int(np.argmax(window_energy))])
    return samples[best : best + length], best


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float [-1, 1] to 16-bit PCM values, the compact form clips are kept in."""
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
