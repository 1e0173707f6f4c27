"""Decoding any audio file within the operator's bounds: formats, rates, channels, and the files
that would otherwise cost a server gigabytes (decode bombs) or a 500 (NaN, huge floats)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from speechclas.audio import (
    AudioError,
    AudioLimits,
    decode_audio,
    fix_length,
    iter_audio_blocks,
    loudest_window,
    open_audio,
    to_int16,
)
from speechclas.limits import Limits

REPO = Path(__file__).resolve().parents[1]
RATE = 16000


def sine(frequency, rate, seconds=0.5, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def wav_bytes(samples, rate, subtype="PCM_16"):
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def peak_frequency(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples))
    return np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))]


# --- decode bombs and other hostile files, as an attacker would send them -----------------


def one_hz_wav() -> bytes:
    """4 KB of 8-bit wav whose header says 1 Hz: 4000 s, 1.1 h of audio at 16 kHz once resampled."""
    data = bytearray(wav_bytes(np.zeros(4000, np.float32), 8000, "PCM_U8"))
    data[24:32] = struct.pack("<II", 1, 1)  # sample rate, byte rate
    return bytes(data)


def silent_flac(seconds: float, rate: int, channels: int, unknown_length: bool = False) -> bytes:
    """FLAC of digital silence, written block by block (it compresses to almost nothing).
    `unknown_length`: STREAMINFO's total sample count is 0, "not known", as a stream encoder leaves it."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as out:
        block = np.zeros((65536, channels), np.float32)
        remaining = int(seconds * rate)
        while remaining > 0:
            out.write(block[: min(remaining, len(block))])
            remaining -= len(block)
    data = bytearray(buffer.getvalue())
    if unknown_length:
        assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
        fields = int.from_bytes(data[18:26], "big")  # rate, channels, bits, then 36 bits of total samples
        data[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    return bytes(data)


def wav_announcing(data_bytes: int, present: bytes = b"\0" * 1000, rate: int = 8000) -> bytes:
    """A 16-bit mono wav header whose data chunk announces `data_bytes`, followed by `present` bytes only."""
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", min(36 + data_bytes, 0xFFFFFFFF), b"WAVE", b"fmt ", 16,
                         1, 1, rate, rate * 2, 2, 16, b"data", data_bytes)
    return header + present


def test_a_one_hz_wav_is_refused_from_its_header():
    bomb = one_hz_wav()
    assert len(bomb) < 4100
    with pytest.raises(AudioError, match=r"bomb\.wav has a sample rate of 1 Hz .*1000 to 384000 Hz "
                                         r"\(operator settings SPEECHCLAS_MIN_SAMPLE_RATE, SPEECHCLAS_MAX_SAMPLE_RATE\)"):
        decode_audio(bomb, RATE, name="bomb.wav")
    # An operator who allows 1 Hz still has the duration bound: 4000 s read from the header.
    lenient = Limits.defaults().replace(min_sample_rate=1)
    with pytest.raises(AudioError, match=r"lasts 4000\.0 s according to its header; the longest accepted is 60 s "
                                         r"\(operator setting SPEECHCLAS_MAX_AUDIO_SECONDS\)"):
        decode_audio(bomb, RATE, name="bomb.wav", limits=lenient)


def test_a_small_many_channel_flac_is_refused_from_its_header():
    bomb = silent_flac(125, RATE, 8)  # 64 MB once decoded to float32
    assert len(bomb) < 20_000
    with pytest.raises(AudioError, match=r"lasts 125\.0 s according to its header; the longest accepted is 60 s"):
        decode_audio(bomb, RATE, name="silence.flac")
    few_channels = Limits.defaults().replace(max_channels=2)
    with pytest.raises(AudioError, match=r"has 8 channels; at most 2 are accepted \(operator setting "
                                         r"SPEECHCLAS_MAX_CHANNELS\)"):
        decode_audio(silent_flac(1, RATE, 8), RATE, name="silence.flac", limits=few_channels)
    with pytest.raises(AudioError, match="has 64 channels; at most 8"):  # FLAC stops at 8; wav does not
        decode_audio(wav_bytes(np.zeros((1600, 64), np.float32), RATE), RATE, name="silence.wav")


def test_a_header_that_does_not_say_its_length_is_stopped_while_decoding():
    bomb = silent_flac(90, 48000, 2, unknown_length=True)
    with open_audio(bomb, "stream.flac") as reader:
        assert reader.header.frames is None  # nothing to refuse up front
    with pytest.raises(AudioError, match=r"stream\.flac holds more than 60 s of audio although its header announces "
                                         r"no duration; the longest accepted is 60 s"):
        decode_audio(bomb, RATE, name="stream.flac")
    # Under the bound it decodes in full.
    decoded = decode_audio(silent_flac(2, 48000, 2, unknown_length=True), RATE)
    assert abs(len(decoded.samples) - 2 * RATE) <= 2 and not decoded.samples.any()


def test_a_wav_header_announcing_hours():
    hours = 3 * 3600 * 8000 * 2  # 3 h of 16-bit 8 kHz
    with pytest.raises(AudioError, match=f"huge.wav is a truncated wav file: its header announces {hours} bytes "
                                         "of audio but only 1000 are present"):
        decode_audio(wav_announcing(hours), RATE, name="huge.wav")
    # A real file that long is refused from its header, before any sample is decoded.
    long_file = wav_bytes(np.zeros(2 * 60 * 1000, np.float32), 1000, "PCM_U8")  # 2 min at 1 kHz, 120 KB
    with pytest.raises(AudioError, match=r"long.wav lasts 120\.0 s according to its header"):
        decode_audio(long_file, RATE, name="long.wav")
    assert len(decode_audio(long_file, RATE, limits=Limits.defaults().replace(max_audio_seconds=120)).samples) == (
        120 * RATE
    )


def test_header_only_and_empty_files():
    with pytest.raises(AudioError, match="header.wav holds no audio samples"):
        decode_audio(wav_announcing(0, present=b""), RATE, name="header.wav")
    with pytest.raises(AudioError, match="header.wav is a truncated wav file"):
        decode_audio(wav_announcing(32000, present=b""), RATE, name="header.wav")
    with pytest.raises(AudioError, match="none.wav holds no audio samples"):
        decode_audio(wav_bytes(np.zeros(0, np.float32), RATE), RATE, name="none.wav")
    with pytest.raises(AudioError, match="upload.wav is empty"):
        decode_audio(b"", RATE, name="upload.wav")


def test_empty_missing_and_not_audio_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav is empty"):
        decode_audio(empty, RATE)
    with pytest.raises(AudioError, match="cannot read .*missing.wav"):
        decode_audio(tmp_path / "missing.wav", RATE)
    notes = tmp_path / "notes.wav"
    notes.write_text("these are not the samples you are looking for\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav is not a readable audio file \(wav, flac or ogg expected\): "
                                         r"Format not recognised"):
        decode_audio(notes, RATE)


def test_a_truncated_wav_is_refused():
    data = wav_bytes(sine(440, RATE), RATE)
    with pytest.raises(AudioError, match="clip.wav is a truncated wav file"):
        decode_audio(data[: len(data) // 2], RATE, name="clip.wav")
    with pytest.raises(AudioError, match="clip.wav"):
        decode_audio(data[:30], RATE, name="clip.wav")  # cut inside the header


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_samples_that_are_not_numbers_are_refused(value):
    samples = sine(440, RATE)
    samples[1234] = value
    with pytest.raises(AudioError, match="nan.wav holds samples that are not finite numbers"):
        decode_audio(wav_bytes(samples, RATE, "FLOAT"), RATE, name="nan.wav")


def test_float_samples_out_of_range_are_clipped():
    samples = sine(440, RATE)
    samples[100], samples[200] = 1e30, -1e30
    decoded = decode_audio(wav_bytes(samples, RATE, "FLOAT"), RATE)
    assert (decoded.samples[100], decoded.samples[200]) == (1.0, -1.0)
    np.testing.assert_array_equal(decoded.samples[300:], samples[300:])
    # Near float32's largest value: mixing channels or resampling must not overflow to inf.
    huge = np.full((RATE, 2), 3e38, np.float32)
    huge[::2] = -3e38
    for rate in (RATE, 44100):
        decoded = decode_audio(wav_bytes(huge, rate, "FLOAT"), RATE)
        assert np.all(np.isfinite(decoded.samples)) and np.abs(decoded.samples).max() <= 1.0


def test_decoding_a_bomb_takes_bounded_memory(tmp_path):
    """Peak memory of a fresh process while it refuses each bomb, measured by the kernel (ru_maxrss).

    The unknown-length FLAC holds 5 min of 8-channel 48 kHz audio: 460 MB as float32 if decoded
    whole, about 10 MB of blocks and output when decoding stops at the 60 s bound."""
    bombs = {
        "one_hz.wav": one_hz_wav(),
        "eight_channels.flac": silent_flac(125, RATE, 8),
        "hours.wav": wav_announcing(3 * 3600 * 8000 * 2),
        "unknown_length.flac": silent_flac(300, 48000, 8, unknown_length=True),
    }
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "legit.flac").write_bytes(silent_flac(60, 48000, 8, unknown_length=True))
    script = textwrap.dedent(f"""
        import json, resource, sys
        from pathlib import Path
        from speechclas.audio import AudioError, decode_audio
        folder = Path({str(tmp_path)!r})
        # Warm up: the same code paths on a legitimate 60 s, 8-channel, 48 kHz file.
        assert len(decode_audio(folder / "legit.flac", 16000).samples) == 60 * 16000
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        answers = {{}}
        for name in {sorted(bombs)!r}:
            try:
                decode_audio(folder / name, 16000)
                answers[name] = "decoded"
            except AudioError as exc:
                answers[name] = str(exc)
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"answers": answers, "grown_mb": grown_kb / 1024}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "sample rate of 1 Hz" in result["answers"]["one_hz.wav"]
    assert "lasts 125.0 s" in result["answers"]["eight_channels.flac"]
    assert "truncated" in result["answers"]["hours.wav"]
    assert "holds more than 60 s" in result["answers"]["unknown_length.flac"]
    assert result["grown_mb"] < 50, result


# --- legitimate audio: formats, rates, channels, sources ------------------------------------


@pytest.mark.parametrize(
    "subtype, tolerance",
    [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-6), ("FLOAT", 0.0)],
)
def test_decode_audio_reads_every_wav_sample_format(subtype, tolerance):
    samples = sine(440, RATE)
    decoded = decode_audio(wav_bytes(samples, RATE, subtype), RATE)
    assert decoded.samples.dtype == np.float32
    assert (decoded.sample_rate, decoded.original_sample_rate, decoded.original_channels) == (RATE, RATE, 1)
    np.testing.assert_allclose(decoded.samples, samples, atol=tolerance + 1e-7)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_decode_audio_resamples_to_the_model_rate(rate):
    decoded = decode_audio(wav_bytes(sine(440, rate, seconds=1.0), rate), RATE)
    assert decoded.original_sample_rate == rate
    assert decoded.sample_rate == RATE
    assert abs(len(decoded.samples) - RATE) <= 2
    assert decoded.duration_s == pytest.approx(1.0, abs=1e-3)
    assert peak_frequency(decoded.samples, RATE) == pytest.approx(440, abs=2)
    assert np.abs(decoded.samples[RATE // 4: -RATE // 4]).max() == pytest.approx(0.5, abs=0.02)


def test_streaming_resampling_matches_resampling_the_whole_clip():
    """Blocks through soxr's streaming resampler give the signal resampling it in one go gives."""
    samples = np.random.default_rng(3).uniform(-0.5, 0.5, 44100 * 3).astype(np.float32)
    data = wav_bytes(samples, 44100, "FLOAT")
    blocks = list(iter_audio_blocks(data, RATE, block_seconds=0.25))
    assert len(blocks) >= 12
    whole = soxr.resample(samples, 44100, RATE, quality="HQ")
    streamed = np.concatenate(blocks)
    assert abs(len(streamed) - len(whole)) <= 1
    n = min(len(streamed), len(whole))
    np.testing.assert_allclose(streamed[:n], whole[:n], atol=1e-4)


def test_iter_audio_blocks_reads_long_audio_with_its_own_bound():
    """Long audio (a detection scan) has a duration bound of its own, named in the refusal."""
    seconds = 150  # over the operator's 60 s for one clip
    data = wav_bytes(np.tile(sine(300, 8000, seconds=1.0), seconds), 8000)
    blocks = list(iter_audio_blocks(data, RATE, max_seconds=3600, max_seconds_setting="SPEECHCLAS_MAX_SCAN_SECONDS",
                                    block_seconds=2.0))
    assert abs(sum(len(block) for block in blocks) - seconds * RATE) <= 2
    assert max(len(block) for block in blocks) <= 2 * 2.0 * RATE  # block-sized pieces, not the whole file
    assert all(block.dtype == np.float32 and block.ndim == 1 for block in blocks)
    with pytest.raises(AudioError, match=r"lasts 150\.0 s .*longest accepted is 100 s \(SPEECHCLAS_MAX_SCAN_SECONDS\)"):
        next(iter_audio_blocks(data, RATE, max_seconds=100, max_seconds_setting="SPEECHCLAS_MAX_SCAN_SECONDS"))
    with pytest.raises(AudioError, match="lasts 150.0 s .*SPEECHCLAS_MAX_AUDIO_SECONDS"):
        next(iter_audio_blocks(data, RATE))
    bounds = AudioLimits.from_limits(Limits.defaults().replace(max_channels=1)).with_max_seconds(200, "200 s here")
    assert sum(len(block) for block in iter_audio_blocks(data, RATE, bounds)) == pytest.approx(seconds * RATE, abs=2)


def test_decode_audio_mixes_stereo_to_mono(tmp_path):
    left = sine(440, RATE)
    right = sine(1000, RATE, amplitude=0.2)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), RATE, subtype="PCM_16")
    decoded = decode_audio(path, RATE)
    assert decoded.original_channels == 2
    assert decoded.samples.ndim == 1
    np.testing.assert_allclose(decoded.samples, (left + right) / 2, atol=1e-4)


@pytest.mark.parametrize("file_format, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_decode_audio_reads_flac_and_ogg(file_format, subtype):
    buffer = io.BytesIO()
    soundfile.write(buffer, sine(440, 22050, seconds=1.0), 22050, format=file_format, subtype=subtype)
    decoded = decode_audio(buffer.getvalue(), RATE)
    assert abs(len(decoded.samples) - RATE) <= 2
    assert peak_frequency(decoded.samples, RATE) == pytest.approx(440, abs=2)


def test_decode_audio_reads_paths_bytes_and_open_files(tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(sine(440, RATE), RATE))
    from_path = decode_audio(path, RATE).samples
    np.testing.assert_array_equal(decode_audio(str(path), RATE).samples, from_path)
    np.testing.assert_array_equal(decode_audio(path.read_bytes(), RATE).samples, from_path)
    with path.open("rb") as handle:
        np.testing.assert_array_equal(decode_audio(handle, RATE).samples, from_path)


# --- windows and sample formats -----------------------------------------------------------


def test_loudest_window_picks_the_loud_part():
    rng = np.random.default_rng(2)
    samples = rng.normal(0, 0.01, 3 * RATE).astype(np.float32)
    samples[int(1.9 * RATE): int(2.2 * RATE)] += sine(300, RATE, seconds=0.3)
    window, start = loudest_window(samples, RATE, RATE // 100)
    assert len(window) == RATE
    assert int(2.2 * RATE) - RATE <= start <= int(1.9 * RATE)
    np.testing.assert_array_equal(window, samples[start: start + RATE])
    # A loud end is reachable even when it is not on the hop grid.
    samples = np.zeros(RATE + 1234, np.float32)
    samples[-100:] = 1.0
    assert loudest_window(samples, RATE, 1000)[1] == 1234


def test_loudest_window_pads_a_short_clip():
    window, start = loudest_window(np.ones(100, np.float32), RATE, 160)
    assert start == 0 and len(window) == RATE
    assert window[:100].all() and not window[100:].any()


def test_fix_length_and_to_int16():
    assert len(fix_length(np.ones(10), 4)) == 4
    np.testing.assert_array_equal(fix_length(np.ones(2), 4), [1, 1, 0, 0])
    np.testing.assert_array_equal(to_int16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])),
                                  [-32767, -32767, 0, 16384, 32767, 32767])
