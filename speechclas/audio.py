"""Decoding audio files into mono float waveforms at the model's rate.

Training and prediction share this decoder, so a clip is turned into
samples the same way in both. libsndfile (through soundfile) reads
8/16/24/32-bit PCM and float wav, flac and ogg; soxr resamples.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

logger = logging.getLogger(__name__)


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


def _check_wav_not_truncated(data: bytes, name: str) -> None:
    """libsndfile silently reads what is there; a wav whose data chunk is
    shorter than its header promises is a truncated upload, so refuse it."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    position = 12
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4]
        (chunk_size,) = struct.unpack("<I", data[position + 4 : position + 8])
        if chunk_id == b"data":
            available = len(data) - position - 8
            # 0 and 0xFFFFFFFF mark streamed wavs whose size was never filled in.
            if chunk_size not in (0, 0xFFFFFFFF) and available < chunk_size:
                raise AudioError(
                    f"{name} is a truncated wav file: its header announces {chunk_size} bytes "
                    f"of audio but only {available} are present"
                )
            return
        position += 8 + chunk_size + (chunk_size % 2)


def decode_audio(source: str | Path | bytes | BinaryIO, sample_rate: int, name: str | None = None) -> DecodedAudio:
    """Read any file libsndfile knows, mix to mono and resample to `sample_rate`."""
    if isinstance(source, (str, Path)):
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise AudioError(f"cannot read {name}: {exc.strerror}") from exc
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.read()
    name = name or "the audio file"
    if not data:
        raise AudioError(f"{name} is empty")
    _check_wav_not_truncated(data, name)
    try:
        samples, original_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile names the in-memory buffer ("<_io.BytesIO object at 0x...>"); keep its reason only.
        reason = re.sub(r"Error opening <[^>]*>: ?", "", str(exc)).strip() or "unknown format"
        raise AudioError(f"{name} is not a readable audio file (wav, flac or ogg expected): {reason}") from exc
    if samples.shape[0] == 0:
        raise AudioError(f"{name} holds no audio samples")
    channels = samples.shape[1]
    mono = samples.mean(axis=1) if channels > 1 else samples[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{name} holds samples that are not finite numbers")
    if original_rate != sample_rate:
        mono = soxr.resample(mono, original_rate, sample_rate, quality="HQ")
    return DecodedAudio(
        samples=np.ascontiguousarray(mono, dtype=np.float32),
        sample_rate=sample_rate,
        original_sample_rate=int(original_rate),
        original_channels=int(channels),
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
