"""Waveform to model input with TF's audio ops, for a whole batch at once.

The same `compute_features` runs in the training pipeline and inside every
exported model, so a deployed model sees exactly what training saw.
The sizes (`feature_settings`) are plain arithmetic and import no
TensorFlow, so DEEPaaS's main process can check a training's sizes before
handing it to a worker. ``preprocess=logmel`` puts a mel filterbank and a
log on the same spectrogram (the features BC-ResNet and TC-ResNet are defined
on); ``preprocess=pcen`` puts the same mel energies through per-channel energy
normalisation instead of the log; ``preprocess=micro`` is TF's audio micro
frontend, the features TFLite Micro computes on a microcontroller.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

PREPROCESS_CHOICES = ("mfcc", "logmel", "pcen", "average", "micro")
# Log-mel: triangular mel filters from 20 Hz (below it a voice has no energy, and
# the lowest filters would be narrower than an FFT bin) to 7600 Hz, 95 % of the
# Nyquist frequency at 16 kHz (kws_streaming's edges); lower rates keep that
# fraction. The offset bounds the log of a silent band at log(1e-6), about -13.8,
# far below a voice's bands yet above float32 noise, so digital silence is finite.
LOGMEL_LOWER_EDGE_HZ = 20.0
LOGMEL_UPPER_EDGE_HZ = 7600.0
LOGMEL_UPPER_EDGE_OF_NYQUIST = 0.95
LOGMEL_OFFSET = 1e-6
# Per-channel energy normalisation (Wang et al. 2017, "Trainable frontend for
# robust and far-field keyword spotting"), fixed at the paper's (and librosa's)
# values: smoother M[t] = (1 - s) M[t-1] + s E[t] from M[0] = E[0] (s per frame:
# a 0.4 s time constant at a 10 ms stride), then (E / (eps + M)^alpha + delta)^r - delta^r.
PCEN_SMOOTHING = 0.025
PCEN_ALPHA = 0.98
PCEN_DELTA = 2.0
PCEN_R = 0.5
PCEN_EPS = 1e-6
# The mel energies are of audio in [-1, 1]; PCEN takes them as the power of int16
# samples (audio * 2**15, so energies * 2**30), the scale 16-bit recordings have.
# The scale only matters through eps and M^(1 - alpha): at [-1, 1], white noise of
# one 16-bit LSB rms (about 2e-7 per FFT bin) lies below eps, so a quiet
# recording's bands are floored by eps rather than normalised, and its features
# depend on its level; at 2**30 that noise is about 0.2, 50 dB above eps, so only
# digital silence meets eps. A voice's bands (M ~ 1e7..1e10) then give
# E/M^alpha ~ 1.4..1.6 E/M, the range where delta = 2 shapes the compression.
PCEN_ENERGY_SCALE = 2.0**30
# TF's speech_commands (input_data.py) scales the micro frontend's float output
# by 10/256, bringing its 0..~670 range to about 0..26.
MICRO_FEATURE_SCALE = 10.0 / 256.0
MICRO_LOWER_BAND_HZ = 125.0
# The frontend's default upper band edge, 7500 Hz, is 15/16 of the Nyquist
# frequency at 16 kHz; lower rates keep that fraction (the op refuses an edge
# at or above Nyquist).
MICRO_UPPER_BAND_HZ = 7500.0
MICRO_UPPER_BAND_OF_NYQUIST = 15 / 16
# Vocal tract length perturbation (Jaitly & Hinton 2013): frequencies are
# scaled by the warp factor up to this fraction of the Nyquist frequency
# (their 4800 Hz at 16 kHz); above it a second straight line keeps the
# Nyquist frequency in place.
WARP_BOUNDARY_OF_NYQUIST = 0.6


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Sizes derived once from the configuration (speech_commands'
    prepare_model_settings)."""

    sample_rate: int
    clip_duration_ms: int
    window_size_ms: float
    window_stride_ms: float
    desired_samples: int
    window_size_samples: int
    window_stride_samples: int
    spectrogram_length: int
    preprocess: str
    feature_bin_count: int
    average_window_width: int
    fingerprint_width: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one model input: (time frames, features, 1 channel)."""
        return (self.spectrogram_length, self.fingerprint_width, 1)


def _next_power_of_two(value: int) -> int:
    return 1 if value == 0 else 2 ** (value - 1).bit_length()


def feature_settings(
    sample_rate: int,
    clip_duration_ms: int,
    window_size_ms: float,
    window_stride_ms: float,
    feature_bin_count: int,
    preprocess: str,
) -> FeatureSettings:
    desired_samples = int(sample_rate * clip_duration_ms / 1000)
    window_size_samples = int(sample_rate * window_size_ms / 1000)
    window_stride_samples = int(sample_rate * window_stride_ms / 1000)
    if window_size_samples < 2 or window_stride_samples < 1:
        raise ValueError("window_size_ms and window_stride_ms are too small for the sample rate")
    length_minus_window = desired_samples - window_size_samples
    spectrogram_length = 0 if length_minus_window < 0 else 1 + length_minus_window // window_stride_samples
    fft_bin_count = 1 + _next_power_of_two(window_size_samples) // 2
    if preprocess == "average":
        average_window_width = max(1, fft_bin_count // feature_bin_count)
        fingerprint_width = math.ceil(fft_bin_count / average_window_width)
    elif preprocess in ("mfcc", "logmel", "pcen", "micro"):
        average_window_width = -1
        fingerprint_width = feature_bin_count
    else:
        raise ValueError(f"unknown preprocess {preprocess!r}")
    if preprocess == "micro":
        for name, value in (("window_size_ms", window_size_ms), ("window_stride_ms", window_stride_ms)):
            if not float(value).is_integer():
                raise ValueError(f"preprocess=micro takes whole milliseconds; {name} is {value}")
    if preprocess == "pcen" and spectrogram_length < 1:
        raise ValueError("preprocess=pcen needs at least one frame per clip")
    return FeatureSettings(
        sample_rate=sample_rate,
        clip_duration_ms=clip_duration_ms,
        window_size_ms=window_size_ms,
        window_stride_ms=window_stride_ms,
        desired_samples=desired_samples,
        window_size_samples=window_size_samples,
        window_stride_samples=window_stride_samples,
        spectrogram_length=spectrogram_length,
        preprocess=preprocess,
        feature_bin_count=feature_bin_count,
        average_window_width=average_window_width,
        fingerprint_width=fingerprint_width,
    )


def settings_from_config(config) -> FeatureSettings:
    return feature_settings(
        sample_rate=config.sample_rate,
        clip_duration_ms=config.clip_duration_ms,
        window_size_ms=config.window_size_ms,
        window_stride_ms=config.window_stride_ms,
        feature_bin_count=config.feature_bin_count,
        preprocess=config.preprocess,
    )


def compute_features(audio: tf.Tensor, settings: FeatureSettings, frequency_warp: tf.Tensor | None = None) -> tf.Tensor:
    """[batch, desired_samples] float audio in [-1, 1] to [batch, time, features, 1].

    AudioSpectrogram takes [samples, channels]; the batch is passed as the
    channels, so one op call covers the whole batch. `frequency_warp` (training
    only): one factor per clip that scales the power spectrogram's frequencies
    (see warp_frequencies); None, as at inference, leaves it alone.
    """
    import tensorflow as tf  # here, not at the top: the sizes above need no TensorFlow

    if settings.preprocess == "micro":
        if frequency_warp is not None:
            raise ValueError("preprocess=micro computes its own spectrogram; it cannot be warped")
        return micro_features(audio, settings)
    channels_last = tf.transpose(audio)
    spectrogram = tf.raw_ops.AudioSpectrogram(
        input=channels_last,
        window_size=settings.window_size_samples,
        stride=settings.window_stride_samples,
        magnitude_squared=True,
    )
    if frequency_warp is not None:
        spectrogram = warp_frequencies(spectrogram, frequency_warp)
    if settings.preprocess == "mfcc":
        features = tf.raw_ops.Mfcc(
            spectrogram=spectrogram,
            sample_rate=settings.sample_rate,
            dct_coefficient_count=settings.feature_bin_count,
        )
    elif settings.preprocess == "logmel":
        features = log_mel(spectrogram, settings)
    elif settings.preprocess == "pcen":
        features = pcen(mel_energies(spectrogram, settings), settings)
    else:
        pooled = tf.nn.pool(
            tf.expand_dims(spectrogram, -1),
            window_shape=[1, settings.average_window_width],
            strides=[1, settings.average_window_width],
            pooling_type="AVG",
            padding="SAME",
        )
        features = tf.squeeze(pooled, -1)
    return tf.expand_dims(features, -1)


def frames_are_independent(settings: FeatureSettings) -> bool:
    """Whether every feature frame is computed from its own samples only, so a
    window of a stream's frames is the features of that window's audio (what
    detection relies on to compute a stream's frames once). Not for pcen: its
    smoother runs from each clip's first frame."""
    return settings.preprocess != "pcen"


def logmel_options(settings: FeatureSettings) -> dict:
    """The log-mel settings a device needs to compute the same features: the
    power spectrum of an `fft_length`-point FFT of each Hann-windowed frame (as
    AudioSpectrogram), `num_mel_bins` triangular HTK-mel filters between the
    edges (tf.signal.linear_to_mel_weight_matrix), then log(mel + log_offset)."""
    nyquist_hz = settings.sample_rate / 2
    return {
        "fft_length": _next_power_of_two(settings.window_size_samples),
        "num_mel_bins": settings.feature_bin_count,
        "lower_edge_hertz": LOGMEL_LOWER_EDGE_HZ,
        "upper_edge_hertz": min(LOGMEL_UPPER_EDGE_HZ, LOGMEL_UPPER_EDGE_OF_NYQUIST * nyquist_hz),
        "log_offset": LOGMEL_OFFSET,
    }


def log_mel(spectrogram: tf.Tensor, settings: FeatureSettings) -> tf.Tensor:
    """Power spectrogram [channels, frames, fft bins] to log-mel [channels, frames, mel bins]:
    a plain Log (a TFLite builtin) after `mel_energies`."""
    import tensorflow as tf

    return tf.math.log(mel_energies(spectrogram, settings) + LOGMEL_OFFSET)


def mel_energies(spectrogram: tf.Tensor, settings: FeatureSettings) -> tf.Tensor:
    """Power spectrogram [channels, frames, fft bins] to mel energies [channels, frames, mel bins].

    The mel matrix is computed eagerly and enters the graph as a constant, so
    every export holds a plain MatMul (a TFLite builtin) after the
    AudioSpectrogram op.
    """
    import tensorflow as tf

    options = logmel_options(settings)
    with tf.init_scope():  # eager even while a tf.function or tf.data map is traced
        weights = tf.signal.linear_to_mel_weight_matrix(
            num_mel_bins=options["num_mel_bins"],
            num_spectrogram_bins=options["fft_length"] // 2 + 1,
            sample_rate=settings.sample_rate,
            lower_edge_hertz=options["lower_edge_hertz"],
            upper_edge_hertz=options["upper_edge_hertz"],
        ).numpy()
    return tf.matmul(spectrogram, tf.constant(weights))


def pcen_options(settings: FeatureSettings) -> dict:
    """The PCEN settings a device needs to compute the same features: the mel
    energies of `logmel_options` (without its log), times `energy_scale`, then per
    band M[t] = (1 - smoothing) M[t-1] + smoothing E[t] from M[0] = E[0] at each
    clip's first frame, and (E / (eps + M)^alpha + delta)^r - delta^r."""
    mel = {key: value for key, value in logmel_options(settings).items() if key != "log_offset"}
    return {
        **mel,
        "energy_scale": PCEN_ENERGY_SCALE,
        "smoothing": PCEN_SMOOTHING,
        "alpha": PCEN_ALPHA,
        "delta": PCEN_DELTA,
        "r": PCEN_R,
        "eps": PCEN_EPS,
    }


def pcen_smoothing_matrix(frames: int, smoothing: float = PCEN_SMOOTHING):
    """The smoother M[t] = (1 - s) M[t-1] + s E[t], M[0] = E[0], over `frames` frames as
    one lower-triangular matrix W (M = W @ E along time): W[t, k] = s (1 - s)^(t - k)
    for 1 <= k <= t, W[t, 0] = (1 - s)^t. The frame count is fixed per model, so the
    recursion becomes one MatMul, which every export and TFLite take as it is."""
    import numpy as np

    t = np.arange(frames)[:, None]
    k = np.arange(frames)[None, :]
    decay = (1.0 - smoothing) ** np.maximum(t - k, 0)
    weights = np.where(k == 0, decay, smoothing * decay)
    return np.where(k <= t, weights, 0.0).astype(np.float32)


def pcen(mel: tf.Tensor, settings: FeatureSettings) -> tf.Tensor:
    """Mel energies [channels, frames, mel bins] (one clip's frames, `spectrogram_length`
    of them) to per-channel energy normalised features of the same shape.

    Each band is divided by its smoothed history (an automatic gain control), which
    takes out a recording's level and a channel's tilt, then compressed by a root
    (dynamic range compression) where the log would only shift them.
    """
    import tensorflow as tf

    frames = mel.shape[-2]
    if frames is not None and frames != settings.spectrogram_length:
        raise ValueError(f"preprocess=pcen computes clips of {settings.spectrogram_length} frames, not {frames}")
    weights = tf.constant(pcen_smoothing_matrix(settings.spectrogram_length).T)  # W^T: time on the right
    energies = tf.maximum(mel, 0.0) * PCEN_ENERGY_SCALE  # >= 0 already; a negative would make the powers NaN
    by_band = tf.transpose(energies, [0, 2, 1])  # [channels, mel bins, frames]: the smoother is a MatMul over time
    smoothed = tf.transpose(tf.matmul(by_band, weights), [0, 2, 1])
    gain = energies / tf.pow(PCEN_EPS + smoothed, PCEN_ALPHA)
    return tf.pow(gain + PCEN_DELTA, PCEN_R) - PCEN_DELTA**PCEN_R


def warp_frequencies(spectrogram: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """Vocal tract length perturbation of a power spectrogram [batch, frames, bins]:
    the content of clip i at frequency f moves to factors[i]·f (below the
    boundary, WARP_BOUNDARY_OF_NYQUIST), so formants and harmonics move, as
    with a longer or shorter vocal tract, while the duration stays. Each
    output bin reads the input linearly interpolated at its source frequency."""
    import tensorflow as tf

    bins = tf.shape(spectrogram)[-1]
    nyquist = tf.cast(bins - 1, tf.float32)
    factors = tf.cast(factors, tf.float32)[:, None]
    output = tf.range(bins, dtype=tf.float32)[None, :]
    output_boundary = WARP_BOUNDARY_OF_NYQUIST * nyquist * tf.minimum(factors, 1.0)
    source_boundary = output_boundary / factors
    upper_slope = (nyquist - source_boundary) / (nyquist - output_boundary)
    source = tf.where(
        output <= output_boundary, output / factors, source_boundary + (output - output_boundary) * upper_slope
    )
    source = tf.clip_by_value(source, 0.0, nyquist)
    lower = tf.floor(source)
    fraction = (source - lower)[:, :, None]
    lower = tf.cast(lower, tf.int32)
    upper = tf.minimum(lower + 1, bins - 1)
    by_bin = tf.transpose(spectrogram, [0, 2, 1])  # gathering whole rows of frames is ~3x faster than single cells
    warped = tf.gather(by_bin, lower, batch_dims=1) * (1.0 - fraction) + tf.gather(by_bin, upper, batch_dims=1) * fraction
    return tf.transpose(warped, [0, 2, 1])


def micro_frontend_options(settings: FeatureSettings) -> dict:
    """The micro frontend's settings that differ from its defaults; a device
    must configure its frontend (TFLite Micro's FrontendConfig) the same."""
    return {
        "sample_rate": settings.sample_rate,
        "window_size": int(settings.window_size_ms),
        "window_step": int(settings.window_stride_ms),
        "num_channels": settings.feature_bin_count,
        "lower_band_limit": MICRO_LOWER_BAND_HZ,
        "upper_band_limit": min(MICRO_UPPER_BAND_HZ, MICRO_UPPER_BAND_OF_NYQUIST * settings.sample_rate / 2),
        "out_scale": 1,
    }


def micro_features(audio: tf.Tensor, settings: FeatureSettings) -> tf.Tensor:
    """The micro frontend on each clip of a batch (the op takes one clip of
    int16 samples), scaled as speech_commands scales it."""
    import tensorflow as tf
    from tensorflow.lite.experimental.microfrontend.python.ops import audio_microfrontend_op

    samples = tf.cast(tf.clip_by_value(audio * 32768.0, -32768.0, 32767.0), tf.int16)
    options = micro_frontend_options(settings)

    def one_clip(clip):
        return audio_microfrontend_op.audio_microfrontend(clip, out_type=tf.float32, **options)

    if audio.shape[-1] == settings.desired_samples:  # model windows, as many as the batch holds
        frames = tf.map_fn(
            one_clip,
            samples,
            fn_output_signature=tf.TensorSpec([settings.spectrogram_length, settings.feature_bin_count], tf.float32),
        )
    else:  # audio of any length (a stream whose frames detection computes once): clip by clip
        frames = tf.stack([one_clip(clip) for clip in tf.unstack(samples)])
    return tf.expand_dims(frames * MICRO_FEATURE_SCALE, -1)
