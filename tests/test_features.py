"""Feature sizes, the TF audio-op features, and decoding any wav to the model's rate."""

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
import tensorflow as tf

from speechclas.audio import (
    AudioError,
    decode_audio,
    fix_length,
    loudest_window,
    to_int16,
)
from speechclas.config import load_param_specs
from speechclas.features import PREPROCESS_CHOICES, compute_features, feature_settings

ROOT = Path(__file__).resolve().parents[1]
DEMO_YES = ROOT / "data" / "demo" / "yes"
RATE = 16000


def defaults(preprocess="mfcc", sample_rate=RATE):
    return feature_settings(
        sample_rate=sample_rate, clip_duration_ms=1000, window_size_ms=30.0, window_stride_ms=10.0,
        feature_bin_count=40, preprocess=preprocess,
    )


def sine(frequency, rate, seconds=0.5, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def wav_bytes(samples, rate, subtype):
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def peak_frequency(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples))
    return np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))]


def test_feature_settings_for_the_recipe_defaults():
    settings = defaults()
    assert settings.desired_samples == 16000
    assert (settings.window_size_samples, settings.window_stride_samples) == (480, 160)
    assert settings.spectrogram_length == 98
    assert settings.fingerprint_width == 40
    assert settings.input_shape == (98, 40, 1)


def test_feature_settings_for_average_pooling():
    """As speech_commands: 257 FFT bins pooled by floor(257/40) = 6 give ceil(257/6) = 43 features."""
    settings = defaults("average")
    assert settings.average_window_width == 6
    assert settings.fingerprint_width == 43
    assert settings.input_shape == (98, 43, 1)


def test_feature_settings_at_another_rate_and_refused_windows():
    settings = defaults(sample_rate=8000)
    assert (settings.desired_samples, settings.window_size_samples, settings.window_stride_samples) == (8000, 240, 80)
    assert settings.spectrogram_length == 98
    with pytest.raises(ValueError, match="too small"):
        feature_settings(4000, 1000, 0.1, 10.0, 40, "mfcc")
    with pytest.raises(ValueError, match="preprocess"):
        feature_settings(RATE, 1000, 30.0, 10.0, 40, "mel")


def test_feature_settings_for_the_micro_frontend():
    settings = defaults("micro")
    assert settings.input_shape == (98, 40, 1)
    with pytest.raises(ValueError, match="whole milliseconds"):
        feature_settings(RATE, 1000, 30.5, 10.0, 40, "micro")


def test_preprocess_choices_agree_with_config_yaml():
    assert load_param_specs()["preprocess"].choices == PREPROCESS_CHOICES


@pytest.mark.parametrize("rate", [RATE, 8000])
def test_micro_features_are_the_recipes(rate):
    """TF's speech_commands: the micro frontend on int16 samples, out_scale 1,
    float output times 10/256, one clip per op call."""
    from tensorflow.lite.experimental.microfrontend.python.ops import audio_microfrontend_op

    settings = defaults("micro", sample_rate=rate)
    audio = np.stack([fix_length(decode_audio(min(DEMO_YES.glob("*.wav")), rate).samples, rate),
                      np.pad(sine(440, rate), (0, rate // 2))])
    features = compute_features(tf.constant(audio), settings).numpy()
    assert features.shape == (2, *settings.input_shape)
    for clip, computed in zip(audio, features, strict=True):
        expected = audio_microfrontend_op.audio_microfrontend(
            tf.constant((clip * 32768).astype(np.int16)), sample_rate=rate, window_size=30, window_step=10,
            num_channels=40, upper_band_limit=min(7500.0, rate * 15 / 32), out_scale=1, out_type=tf.float32,
        ).numpy() * 10 / 256
        np.testing.assert_allclose(computed[..., 0], expected, atol=1e-6)
    assert 5 < features.max() < 30


def demo_audio():
    return fix_length(decode_audio(min(DEMO_YES.glob("*.wav")), RATE).samples, RATE)


@pytest.mark.parametrize("preprocess", PREPROCESS_CHOICES)
@pytest.mark.parametrize("kind", ["random", "silence", "demo"])
def test_compute_features_has_the_derived_shape_and_finite_values(preprocess, kind):
    settings = defaults(preprocess)
    if kind == "random":
        audio = np.random.default_rng(0).uniform(-1, 1, (3, RATE)).astype(np.float32)
    elif kind == "silence":
        audio = np.zeros((3, RATE), np.float32)
    else:
        audio = np.stack([demo_audio()] * 3)
    features = compute_features(tf.constant(audio), settings).numpy()
    assert features.shape == (3, *settings.input_shape)
    assert features.dtype == np.float32
    assert np.all(np.isfinite(features))


def test_features_tell_clips_apart():
    settings = defaults()
    audio = np.stack([np.zeros(RATE, np.float32), demo_audio(), np.pad(sine(1000, RATE), (0, RATE // 2))])
    features = compute_features(tf.constant(audio), settings).numpy()
    assert not np.allclose(features[0], features[1], atol=1e-3)
    assert not np.allclose(features[1], features[2], atol=1e-3)


@pytest.mark.parametrize("preprocess", PREPROCESS_CHOICES)
def test_batching_does_not_change_a_clips_features(preprocess):
    settings = defaults(preprocess)
    rng = np.random.default_rng(1)
    audio = np.stack([
        demo_audio(),
        rng.normal(0, 0.1, RATE).astype(np.float32),
        np.zeros(RATE, np.float32),
        np.pad(sine(440, RATE), (0, RATE // 2)),
    ])
    batched = compute_features(tf.constant(audio), settings).numpy()
    for position, clip in enumerate(audio):
        alone = compute_features(tf.constant(clip[None, :]), settings).numpy()[0]
        np.testing.assert_allclose(batched[position], alone, rtol=1e-5, atol=1e-4)


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
    decoded = decode_audio(wav_bytes(sine(440, rate, seconds=1.0), rate, "PCM_16"), RATE)
    assert decoded.original_sample_rate == rate
    assert decoded.sample_rate == RATE
    assert abs(len(decoded.samples) - RATE) <= 2
    assert decoded.duration_s == pytest.approx(1.0, abs=1e-3)
    assert peak_frequency(decoded.samples, RATE) == pytest.approx(440, abs=2)
    assert np.abs(decoded.samples[RATE // 4: -RATE // 4]).max() == pytest.approx(0.5, abs=0.02)


def test_decode_audio_mixes_stereo_to_mono(tmp_path):
    left = sine(440, RATE)
    right = sine(1000, RATE, amplitude=0.2)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), RATE, subtype="PCM_16")
    decoded = decode_audio(path, RATE)
    assert decoded.original_channels == 2
    assert decoded.samples.ndim == 1
    np.testing.assert_allclose(decoded.samples, (left + right) / 2, atol=1e-4)


def test_decode_audio_reads_paths_bytes_and_open_files(tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(sine(440, RATE), RATE, "PCM_16"))
    from_path = decode_audio(path, RATE).samples
    np.testing.assert_array_equal(decode_audio(str(path), RATE).samples, from_path)
    np.testing.assert_array_equal(decode_audio(path.read_bytes(), RATE).samples, from_path)
    with path.open("rb") as handle:
        np.testing.assert_array_equal(decode_audio(handle, RATE).samples, from_path)


def test_decode_audio_refuses_an_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav is empty"):
        decode_audio(path, RATE)
    with pytest.raises(AudioError, match="upload.wav is empty"):
        decode_audio(b"", RATE, name="upload.wav")


def test_decode_audio_refuses_a_file_that_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are not the samples you are looking for\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav is not a readable audio file"):
        decode_audio(path, RATE)


def test_decode_audio_refuses_a_truncated_wav():
    data = wav_bytes(sine(440, RATE), RATE, "PCM_16")
    with pytest.raises(AudioError, match="clip.wav is a truncated wav file"):
        decode_audio(data[: len(data) // 2], RATE, name="clip.wav")
    with pytest.raises(AudioError, match="clip.wav"):
        decode_audio(data[:30], RATE, name="clip.wav")  # cut inside the header


def test_decode_audio_refuses_a_missing_file(tmp_path):
    with pytest.raises(AudioError, match="cannot read .*missing.wav"):
        decode_audio(tmp_path / "missing.wav", RATE)


def test_decode_audio_refuses_a_wav_without_samples():
    with pytest.raises(AudioError, match="no audio samples"):
        decode_audio(wav_bytes(np.zeros(0, np.float32), RATE, "PCM_16"), RATE, name="none.wav")


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
