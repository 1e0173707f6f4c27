"""The training augmentations do what they say, to the amount configured:
masks of the configured count and widths, speed changes duration and pitch,
the frequency warp moves pitch but not duration, noise lands at the drawn SNR,
gain stays in range, mixup mixes features and targets alike; the same seed
gives the same batches; evaluation inputs never change."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from speechclas import confine, pipeline, train
from speechclas.config import ConfigError, load_config
from speechclas.features import compute_features, feature_settings, settings_from_config
from speechclas.pipeline import (
    AugmentSettings,
    TrainingAudio,
    augment,
    augment_settings_from_config,
    change_speed,
    mixup,
    spec_augment,
    training_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
RATE = 16000
SILENCE, UNKNOWN = 0, 1
SEED = tf.constant([11, 3], tf.int64)
ALL_ON = {
    "speed_perturbation": 0.15, "pitch_perturbation": 0.1, "background_snr_db": "5,20", "gain_db": 6.0,
    "spec_time_masks": 2, "spec_time_mask_ms": 100.0, "spec_freq_masks": 2, "spec_freq_mask_bins": 5,
    "mixup_alpha": 0.3,
}


def plain(**changes) -> AugmentSettings:
    """Everything off (no shift, no noise), then `changes`."""
    settings = AugmentSettings(time_shift_samples=0, background_volume=0.0, background_frequency=0.0,
                               silence_label=SILENCE)
    return AugmentSettings(**{**settings.__dict__, **changes})


def tone(frequency: float, rows: int = 1, voiced_s: float = 0.5, amplitude: float = 0.3) -> np.ndarray:
    """[rows, 1 s] of silence with a tone in the middle `voiced_s` seconds."""
    clip = np.zeros(RATE, np.float32)
    start = int(RATE * (1 - voiced_s) / 2)
    t = np.arange(int(RATE * voiced_s)) / RATE
    clip[start:start + len(t)] = amplitude * np.sin(2 * np.pi * frequency * t)
    return np.tile(clip, (rows, 1))


def dominant_frequency(clip: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(clip, n=8 * len(clip)))
    return float(np.argmax(spectrum)) * RATE / (8 * len(clip))


def voiced_length(clip: np.ndarray) -> int:
    loud = np.flatnonzero(np.abs(clip) > 1e-3)
    return int(loud[-1] - loud[0] + 1)


def test_speed_change_scales_pitch_by_the_factor_and_duration_by_its_inverse():
    clips = tone(440.0, rows=3)
    factors = np.array([0.85, 1.0, 1.15], np.float32)
    out = change_speed(tf.constant(clips), tf.constant(factors)).numpy()
    for row, factor in zip(out, factors, strict=True):
        assert dominant_frequency(row) == pytest.approx(440.0 * factor, abs=1.5)
        assert voiced_length(row) == pytest.approx(RATE * 0.5 / factor, abs=3)
        # Centred: the voiced part stays in the middle of the clip.
        loud = np.flatnonzero(np.abs(row) > 1e-3)
        assert (loud[0] + loud[-1]) / 2 == pytest.approx(RATE / 2, abs=3)


def test_speed_perturbation_draws_factors_within_the_range():
    clips = tone(500.0, rows=64)
    out = augment(tf.constant(clips), tf.fill([64], 2), tf.zeros([0]), plain(speed_perturbation=0.15), SEED).numpy()
    factors = np.array([dominant_frequency(row) / 500.0 for row in out])
    lengths = np.array([voiced_length(row) for row in out])
    assert factors.min() >= 0.85 - 0.01 and factors.max() <= 1.15 + 0.01
    assert factors.min() < 0.9 and factors.max() > 1.1  # spread over the range, not one factor
    np.testing.assert_allclose(lengths, RATE * 0.5 / factors, rtol=0.01)


def test_frequency_warp_moves_the_pitch_and_keeps_the_duration():
    settings = feature_settings(RATE, 1000, 30.0, 10.0, 257, "average")  # every FFT bin, 31.25 Hz apart
    assert settings.average_window_width == 1
    clips = tf.constant(tone(1000.0, rows=3))
    factors = [0.9, 1.0, 1.1]
    plain_features = compute_features(clips, settings)[..., 0].numpy()
    warped = compute_features(clips, settings, frequency_warp=tf.constant(factors))[..., 0].numpy()
    np.testing.assert_allclose(warped[1], plain_features[1], rtol=1e-6, atol=1e-9)  # factor 1 changes nothing
    bin_hz = RATE / 2 / 256
    for row, factor in zip(warped, factors, strict=True):
        peak_bin = np.argmax(row.sum(axis=0))
        assert peak_bin * bin_hz == pytest.approx(1000.0 * factor, abs=bin_hz)
        # Duration kept: the same frames carry the tone.
        loud_frames = row.sum(axis=1) > 0.01 * row.sum(axis=1).max()
        np.testing.assert_array_equal(loud_frames, plain_features[1].sum(axis=1) > 0.01 * plain_features[1].sum(
            axis=1).max())


def test_frequency_warp_on_mfcc_changes_the_features_and_micro_refuses_it():
    clips = tf.constant(tone(700.0, rows=2))
    mfcc = feature_settings(RATE, 1000, 30.0, 10.0, 40, "mfcc")
    warped = compute_features(clips, mfcc, frequency_warp=tf.constant([0.9, 1.1])).numpy()
    assert warped.shape == (2, 98, 40, 1) and np.isfinite(warped).all()
    assert not np.allclose(warped[0], warped[1], atol=1e-2)
    with pytest.raises(ValueError, match="micro"):
        compute_features(clips, feature_settings(RATE, 1000, 30.0, 10.0, 40, "micro"), frequency_warp=tf.ones([2]))


def masked_runs(flags: np.ndarray) -> list[int]:
    """Lengths of the runs of True."""
    runs, length = [], 0
    for flag in [*flags, False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


@pytest.mark.parametrize("time_masks, time_frames, freq_masks, freq_bins", [(1, 10, 1, 8), (2, 5, 3, 4)])
def test_spec_augment_masks_have_the_configured_count_and_widths(time_masks, time_frames, freq_masks, freq_bins):
    rows, frames, bins = 300, 98, 40
    features = tf.random.stateless_normal([rows, frames, bins, 1], [1, 2])
    settings = plain(spec_time_masks=time_masks, spec_time_mask_frames=time_frames,
                     spec_freq_masks=freq_masks, spec_freq_mask_bins=freq_bins)
    out = spec_augment(features, settings, SEED).numpy()[..., 0]
    original = features.numpy()[..., 0]
    mean_frame = original.mean(axis=1, keepdims=True)
    changed = out != original
    np.testing.assert_allclose(out[changed], np.broadcast_to(mean_frame, out.shape)[changed], atol=1e-6)
    time_widths, bin_widths = [], []
    for row in changed:
        masked_frames, masked_bins = row.all(axis=1), row.all(axis=0)
        # Every changed cell lies in a masked band of frames or of bins.
        assert not (row & ~masked_frames[:, None] & ~masked_bins[None, :]).any()
        for flags, count, width, widths in ((masked_frames, time_masks, time_frames, time_widths),
                                            (masked_bins, freq_masks, freq_bins, bin_widths)):
            runs = masked_runs(flags)
            assert len(runs) <= count and sum(runs) <= count * width
            if count == 1:
                widths.extend(runs or [0])
    if time_masks == 1:
        assert max(time_widths) == time_frames and min(time_widths) == 0  # widths drawn from 0..max
        assert max(bin_widths) == freq_bins and min(bin_widths) == 0
    else:  # overlapping masks merge, but on average each adds about width / 2
        assert np.mean(changed.all(axis=2).sum(axis=1)) == pytest.approx(time_masks * time_frames / 2, rel=0.25)


def test_spec_time_mask_width_comes_from_milliseconds():
    config = load_config({"spec_time_masks": 2, "spec_time_mask_ms": 100.0, "spec_freq_masks": 1,
                          "spec_freq_mask_bins": 7})
    settings = augment_settings_from_config(config, settings_from_config(config), SILENCE)
    assert (settings.spec_time_masks, settings.spec_time_mask_frames) == (2, 10)  # 10 ms stride
    assert (settings.spec_freq_masks, settings.spec_freq_mask_bins) == (1, 7)


def noise_power_ratio_db(speech: np.ndarray, mixed: np.ndarray) -> np.ndarray:
    noise = mixed - speech
    return 10 * np.log10(np.mean(speech**2, axis=1) / np.mean(noise**2, axis=1))


@pytest.mark.parametrize("snr_range", [(10.0, 10.0), (0.0, 20.0)])
def test_background_noise_is_mixed_at_the_drawn_snr(snr_range):
    rows = 64
    speech = tone(300.0, rows=rows, voiced_s=0.8, amplitude=0.2)
    background = tf.random.stateless_normal([3 * RATE], [5, 6], stddev=0.05)
    labels = tf.constant([2] * (rows - 4) + [SILENCE] * 4, tf.int32)
    settings = plain(background_frequency=1.0, background_volume=0.9, background_snr_db=snr_range)
    out = augment(tf.constant(speech), labels, background, settings, SEED).numpy()
    snr = noise_power_ratio_db(speech[:-4], out[:-4])
    low, high = snr_range
    assert snr.min() >= low - 0.01 and snr.max() <= high + 0.01
    if low < high:
        assert snr.max() - snr.min() > 0.5 * (high - low)
    # Silence rows keep their own rule: noise only, at a volume up to 1.
    assert np.abs(out[-4:]).max() <= np.abs(background.numpy()).max() + 1e-6
    assert np.abs(out[-4:]).max() > 0


def test_gain_stays_within_its_range():
    rows = 64
    speech = tone(300.0, rows=rows, amplitude=0.1)
    out = augment(tf.constant(speech), tf.fill([rows], 2), tf.zeros([0]), plain(gain_db=6.0), SEED).numpy()
    voiced = np.abs(speech[0]) > 1e-3
    ratios = out[:, voiced] / speech[:, voiced]
    np.testing.assert_allclose(ratios, ratios[:, :1] * np.ones_like(ratios), rtol=1e-4)  # one gain per clip
    gain_db = 20 * np.log10(ratios[:, 0])
    assert gain_db.min() >= -6.0 - 1e-3 and gain_db.max() <= 6.0 + 1e-3
    assert gain_db.min() < -3 and gain_db.max() > 3


def test_mixup_mixes_features_and_targets_alike():
    rows = 16
    targets = tf.one_hot(tf.range(rows) % 8, 8)
    label_of_row = (np.arange(rows) % 8).astype(np.float32)
    features = tf.constant(np.broadcast_to(label_of_row[:, None, None, None], (rows, 4, 3, 1)).copy())
    mixed, mixed_targets = mixup(features, targets, 0.4, SEED)
    mixed, mixed_targets = mixed.numpy(), mixed_targets.numpy()
    assert mixed_targets.min() >= 0 and mixed_targets.max() <= 1
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    assert ((mixed_targets > 0).sum(axis=1) <= 2).all()  # each row mixes two clips
    # A row's features are the same convex combination as its targets.
    np.testing.assert_allclose(mixed[:, 0, 0, 0], mixed_targets @ np.arange(8), rtol=1e-5, atol=1e-5)
    assert ((mixed_targets > 0.05) & (mixed_targets < 0.95)).any()  # some rows really are mixed


@pytest.fixture(scope="module")
def demo():
    config = load_config({"data_dir": str(DEMO), "batch_size": 32, **ALL_ON})
    settings = settings_from_config(config)
    return config, settings, train.prepare_data(config, settings, DEMO, DEMO / "no_split_files")


def batches(dataset, count=2):
    return [(features.numpy(), targets.numpy()) for features, targets in dataset.take(count)]


def test_the_same_seed_gives_the_same_batches_whatever_the_parallelism(demo):
    config, settings, prepared = demo
    first = batches(train.training_pipeline(config, settings, prepared.training))
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    serial = batches(train.training_pipeline(config, settings, prepared.training).with_options(options))
    other_seed = batches(train.training_pipeline(config.replace(random_seed=config.random_seed + 1), settings,
                                                 prepared.training))
    for (features, targets), (same_features, same_targets), (other_features, _) in zip(
            first, serial, other_seed, strict=True):
        np.testing.assert_array_equal(features, same_features)
        np.testing.assert_array_equal(targets, same_targets)
        assert not np.allclose(features, other_features)
    assert not np.array_equal(first[0][0], first[1][0])  # each batch draws anew


def test_augmentation_in_the_train_step_makes_the_input_pipelines_batches(demo):
    """augment_on=train_step: tf.data hands int16 clips and the batch's seed, and the compiled
    step's batch_preparation makes the very batches the input pipeline makes otherwise."""
    config, settings, prepared = demo
    in_pipeline = batches(train.training_pipeline(config, settings, prepared.training), count=3)
    raw = train.training_pipeline(config, settings, prepared.training, in_step=True)
    prepare = tf.function(train.batch_preparation(config, settings, prepared.training))
    for (clips, labels, seed), (features, targets) in zip(raw.take(3), in_pipeline, strict=True):
        assert clips.dtype == tf.int16 and clips.shape == (32, settings.desired_samples)
        made_features, made_targets = prepare(clips, labels, seed)
        np.testing.assert_allclose(made_features.numpy(), features, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(made_targets.numpy(), targets, rtol=1e-6, atol=1e-6)


def test_a_training_that_augments_in_its_step_learns_and_exports(tmp_path):
    config = load_config({"data_dir": str(DEMO), "models_dir": str(tmp_path), "augment_on": "train_step",
                          "model_architecture": "tiny_conv", "how_many_training_steps": "60,20",
                          "learning_rate": "0.002,0.0005", "batch_size": 50, "eval_step_interval": 80,
                          "streaming_minutes": 0})
    result = train.train(config, progress=False)
    metrics = result.metrics
    assert metrics["steps"] == 80 and metrics["testing"]["accuracy"] > 2.5 / len(metrics["labels"])
    assert abs(metrics["exports"]["model_int8.tflite"]["test_accuracy"] - metrics["testing"]["accuracy"]) < 0.1


def test_with_every_augmentation_on_training_still_steps_and_evaluation_inputs_stay_clean(demo):
    config, settings, prepared = demo
    dataset = train.training_pipeline(config, settings, prepared.training)
    features, targets = next(iter(dataset))
    labels = len(prepared.index.labels)
    assert features.shape == (32, 98, 40, 1) and targets.shape == (32, labels) and targets.dtype == tf.float32
    assert np.isfinite(features.numpy()).all()
    np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert (targets.numpy().max(axis=1) < 1).any()  # mixed targets

    model = tf.keras.Sequential([tf.keras.Input(settings.input_shape), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(labels)])
    optimizer = tf.keras.optimizers.Adam(0.001)
    step = train.make_train_step(model, optimizer, tf.Variable(0, dtype=tf.int64), check_nans=True)
    loss, accuracy = step(features, targets)
    assert np.isfinite(loss.numpy()) and 0 <= accuracy.numpy() <= 1
    assert train.representative_features(iter(dataset), 40).shape == (40, 98, 40, 1)

    audio, split_labels = prepared.evaluation["validation"]
    evaluated = [f.numpy() for f, _ in pipeline.evaluation_dataset(audio, split_labels, settings, 256)]
    expected = compute_features(tf.cast(audio, tf.float32) / 32768.0, settings).numpy()
    np.testing.assert_allclose(np.concatenate(evaluated), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides, reason", [
    ({"background_snr_db": "10"}, "low,high"),
    ({"background_snr_db": "20,10"}, "low <= high"),
    ({"background_snr_db": "10,200"}, "between"),
    ({"speed_perturbation": 0.9}, "between"),
])
def test_wrong_augmentation_settings_are_refused(overrides, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(overrides)


def test_micro_trains_without_the_pitch_perturbation_it_cannot_apply():
    config = load_config({"preprocess": "micro", "window_stride_ms": 20, "pitch_perturbation": 0.1})
    settings = augment_settings_from_config(config, settings_from_config(config), SILENCE)
    assert settings.pitch_perturbation == 0.0 and settings.speed_perturbation == config.speed_perturbation


def test_default_augmentation_is_the_measured_one_and_an_empty_snr_range_keeps_the_recipe():
    defaults = augment_settings_from_config(load_config({}), settings_from_config(load_config({})), SILENCE)
    # Chosen on the held-out engines of benchmarks/time_to_accuracy.py (README, Time to accuracy).
    assert (defaults.speed_perturbation, defaults.pitch_perturbation, defaults.background_snr_db) == (0.1, 0.1, (5.0, 20.0))
    assert (defaults.spec_time_masks, defaults.spec_freq_masks, defaults.mixup_alpha) == (2, 2, 0.0)
    off = {"speed_perturbation": 0, "pitch_perturbation": 0, "gain_db": 0, "spec_time_masks": 0,
           "spec_time_mask_ms": 0, "spec_freq_masks": 0, "spec_freq_mask_bins": 0}
    config = load_config({"background_snr_db": "", **off})
    settings = augment_settings_from_config(config, settings_from_config(config), SILENCE)
    assert settings.background_snr_db is None
    assert settings == AugmentSettings(
        time_shift_samples=1600, background_volume=0.1, background_frequency=0.8, silence_label=SILENCE
    )
    assert load_config({"background_snr_db": "0,20"}).background_snr_db == (0.0, 20.0)


def test_training_audio_targets_have_one_column_per_label():
    audio = TrainingAudio(
        wanted_audio=np.zeros((2, 1600), np.int16), wanted_labels=np.array([2, 3], np.int32),
        unknown_audio=np.zeros((0, 1600), np.int16), unknown_label=UNKNOWN, silence_label=SILENCE,
        background=np.zeros(0, np.float32), label_count=6,
    )
    short = feature_settings(RATE, 100, 30.0, 10.0, 10, "mfcc")
    dataset = training_dataset(audio, short, plain(), 4, 0.0, 0.0, 1)
    _, targets = next(iter(dataset))
    assert targets.shape == (4, 6)
    assert set(np.argmax(targets.numpy(), axis=1)) <= {2, 3}


def test_the_memory_estimate_of_an_api_training_counts_the_augmentations():
    clips = confine.ClipCount(wanted=1000, other=500, background_seconds=60.0)
    plain_config = load_config({"batch_size": 512, "background_snr_db": "", "speed_perturbation": 0,
                                "pitch_perturbation": 0, "gain_db": 0, "spec_time_masks": 0, "spec_freq_masks": 0})
    augmented = load_config({"batch_size": 512, **ALL_ON})
    settings = settings_from_config(plain_config)
    plain_estimate = confine.estimate_memory(plain_config, settings, clips)
    augmented_estimate = confine.estimate_memory(augmented, settings, clips)
    assert augmented_estimate.audio == plain_estimate.audio
    assert augmented_estimate.batches > 1.5 * plain_estimate.batches
