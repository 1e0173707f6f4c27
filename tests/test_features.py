"""Feature sizes and the TF audio-op features (decoding is tested in test_audio.py)."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from speechclas.audio import decode_audio, fix_length
from speechclas.config import load_param_specs
from speechclas.features import (
    PREPROCESS_CHOICES,
    compute_features,
    feature_settings,
    logmel_options,
    mel_energies,
    pcen_options,
)

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


def numpy_mel_matrix(fft_bin_count, mel_bin_count, rate, lower_hz, upper_hz):
    """Triangular filters, equally spaced in HTK mel (1127 ln(1 + f/700)), over the FFT bin
    frequencies; the DC bin takes no weight. Written from the definition, not from tf.signal."""
    def mel(hz):
        return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)

    bin_mels = mel(np.linspace(0, rate / 2, fft_bin_count))[1:, None]
    edges = np.linspace(mel(lower_hz), mel(upper_hz), mel_bin_count + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mels - lower) / (centre - lower)
    falling = (upper - bin_mels) / (upper - centre)
    return np.pad(np.maximum(0, np.minimum(rising, falling)), ((1, 0), (0, 0)))


@pytest.mark.parametrize("rate", [RATE, 8000])
def test_logmel_is_the_log_of_mel_filters_on_the_power_spectrogram(rate):
    settings = defaults("logmel", sample_rate=rate)
    audio = np.stack([fix_length(decode_audio(min(DEMO_YES.glob("*.wav")), rate).samples, rate),
                      np.pad(sine(440, rate), (0, rate // 2)), np.zeros(rate, np.float32)])
    features = compute_features(tf.constant(audio), settings).numpy()
    power = tf.raw_ops.AudioSpectrogram(input=tf.constant(audio.T), window_size=settings.window_size_samples,
                                        stride=settings.window_stride_samples, magnitude_squared=True).numpy()
    # 20 Hz to 7600 Hz at 16 kHz, 95 % of the Nyquist frequency below it.
    upper_hz = 7600.0 if rate == RATE else 3800.0
    weights = numpy_mel_matrix(power.shape[-1], 40, rate, 20.0, upper_hz)
    expected = np.log(power.astype(np.float64) @ weights + 1e-6)
    assert features.shape == (3, 98, 40, 1)
    np.testing.assert_allclose(features[..., 0], expected, rtol=1e-4, atol=1e-3)
    assert features[2].max() == pytest.approx(np.log(1e-6))  # digital silence: the offset's log, not -inf
    assert features[0].max() > 0  # a voice stands far above it


def test_logmel_sizes_follow_the_settings():
    settings = feature_settings(sample_rate=8000, clip_duration_ms=750, window_size_ms=25.0, window_stride_ms=20.0,
                                feature_bin_count=32, preprocess="logmel")
    # 6000 samples, windows of 200 every 160: 1 + (6000 - 200) // 160 = 37 frames of 32 mel bins.
    assert settings.input_shape == (37, 32, 1)
    options = logmel_options(settings)
    assert options["fft_length"] == 256 and options["upper_edge_hertz"] == pytest.approx(3800.0)
    audio = np.random.default_rng(2).normal(0, 0.1, (2, settings.desired_samples)).astype(np.float32)
    features = compute_features(tf.constant(audio), settings).numpy()
    assert features.shape == (2, *settings.input_shape)
    assert np.all(np.isfinite(features))


def numpy_pcen(energies, s=0.025, alpha=0.98, delta=2.0, r=0.5, eps=1e-6):
    """PCEN (Wang et al. 2017) of mel energies [clips, frames, bands] as the recursion, frame by frame."""
    energies = np.asarray(energies, np.float64)
    smoothed = np.empty_like(energies)
    smoothed[:, 0] = energies[:, 0]
    for t in range(1, energies.shape[1]):
        smoothed[:, t] = (1 - s) * smoothed[:, t - 1] + s * energies[:, t]
    return (energies / (eps + smoothed) ** alpha + delta) ** r - delta**r


def power_spectrogram(audio, settings):
    return tf.raw_ops.AudioSpectrogram(input=tf.constant(audio.T), window_size=settings.window_size_samples,
                                       stride=settings.window_stride_samples, magnitude_squared=True)


def speech_like(rate=RATE, seed=3):
    """A demo word (its level varies over 1 s) over quiet noise, so no band is digital silence."""
    noise = np.random.default_rng(seed).normal(0, 1e-3, rate).astype(np.float32)
    return demo_audio() + noise


def test_pcen_is_the_recursion_on_the_mel_energies():
    """The smoother as one matrix product equals the recursion M[t] = (1 - s) M[t-1] + s E[t],
    M[0] = E[0], on the mel energies logmel takes its log of, scaled as int16 power."""
    settings = defaults("pcen")
    assert settings.input_shape == (98, 40, 1)
    rng = np.random.default_rng(4)
    audio = np.stack([speech_like(), demo_audio(), rng.normal(0, 0.1, RATE).astype(np.float32),
                      np.pad(sine(440, RATE), (RATE // 4, RATE // 4)), np.zeros(RATE, np.float32)])
    features = compute_features(tf.constant(audio), settings).numpy()
    assert features.shape == (5, *settings.input_shape)
    energies = mel_energies(power_spectrogram(audio, settings), settings).numpy()
    expected = numpy_pcen(energies * 2.0**30)
    np.testing.assert_allclose(features[..., 0], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(features[4], 0.0)  # digital silence: E = M = 0
    options = pcen_options(settings)
    assert (options["smoothing"], options["alpha"], options["delta"], options["r"], options["eps"]) == (
        0.025, 0.98, 2.0, 0.5, 1e-6)
    assert options["energy_scale"] == 2.0**30 and "log_offset" not in options
    assert {key: options[key] for key in logmel_options(settings) if key != "log_offset"} == {
        key: value for key, value in logmel_options(settings).items() if key != "log_offset"}


def test_pcen_takes_out_the_level_logmel_only_shifts():
    """The same clip 20 dB louder: logmel moves by log(100) = 4.6 in every cell, pcen's
    features stay within a few percent of their spread (each band is divided by its own
    smoothed history; only M^(1 - alpha) = 100^0.02, about 1.1, is left of the gain)."""
    clip = speech_like()
    audio = np.stack([clip, 10 * clip])
    logmel = compute_features(tf.constant(audio), defaults("logmel")).numpy()
    assert np.median(logmel[1] - logmel[0]) == pytest.approx(np.log(100), rel=0.01)
    quiet, loud = compute_features(tf.constant(audio), defaults("pcen")).numpy()
    spread = quiet.std()
    assert spread > 0.3
    assert np.abs(loud - quiet).mean() < 0.1 * spread
    assert np.abs(logmel[1] - logmel[0]).mean() > logmel[0].std()  # the shift outgrows logmel's own spread


def test_pcen_refuses_a_stream_of_another_length():
    """The smoother is fixed to a clip's frames; detection scores pcen windows clip by clip."""
    settings = defaults("pcen")
    with pytest.raises(ValueError, match="98 frames"):
        compute_features(tf.zeros([1, 2 * RATE]), settings)
