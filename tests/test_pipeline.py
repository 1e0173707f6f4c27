"""The tf.data pipelines: training inputs are augmented, evaluation inputs never
change, the label mix follows the percentages, and the whole chain runs on the
demo dataset."""

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile
import tensorflow as tf

from speechclas import data, train
from speechclas.config import load_config
from speechclas.features import compute_features, feature_settings, settings_from_config
from speechclas.pipeline import (
    AugmentSettings,
    TrainingAudio,
    augment,
    augment_settings_from_config,
    evaluation_dataset,
    training_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
RATE = 16000
SILENCE, UNKNOWN = 0, 1
# One clip per label, so a training row's label tells which clip it came from.
WANTED_CLIPS = {2: "yes", 3: "no", 4: "up"}
UNKNOWN_CLIP = "bed"
NUM_LABELS = 5
SEED = tf.constant([7, 0], tf.int64)


@pytest.fixture(scope="module")
def settings():
    return feature_settings(RATE, 1000, 30.0, 10.0, 40, "mfcc")


def demo_clip(word):
    return f"{word}/{min(p.name for p in (DEMO / word).glob('*.wav'))}"


@pytest.fixture(scope="module")
def demo_audio(settings):
    """int16 clips: the wanted ones in label order, then the unknown one."""
    paths = [demo_clip(word) for word in WANTED_CLIPS.values()] + [demo_clip(UNKNOWN_CLIP)]
    return data.load_clips(DEMO, paths, RATE, settings.desired_samples).audio


@pytest.fixture(scope="module")
def background(settings):
    files = [f"{data.BACKGROUND_NOISE_DIR}/{p.name}" for p in sorted((DEMO / data.BACKGROUND_NOISE_DIR).iterdir())]
    noise, skipped = data.load_background(DEMO, files, RATE, settings.desired_samples)
    assert skipped == ()
    return noise


def training_audio(demo_audio, background):
    return TrainingAudio(
        wanted_audio=demo_audio[:3],
        wanted_labels=np.array(list(WANTED_CLIPS), np.int32),
        unknown_audio=demo_audio[3:],
        unknown_label=UNKNOWN,
        silence_label=SILENCE,
        background=background,
        label_count=NUM_LABELS,
    )


def recipe_augmentation(time_shift_ms=100.0, background_volume=0.1, background_frequency=0.8):
    return AugmentSettings(
        time_shift_samples=int(RATE * time_shift_ms / 1000),
        background_volume=background_volume,
        background_frequency=background_frequency,
        silence_label=SILENCE,
    )


NO_AUGMENTATION = recipe_augmentation(time_shift_ms=0.0, background_volume=0.0, background_frequency=0.0)


def first_batches(dataset, count):
    """Features and integer labels of the first batches; a training
    dataset's one-hot targets (no mixup here) are turned back into labels."""
    features, labels = zip(*[(f.numpy(), lab.numpy()) for f, lab in dataset.take(count)], strict=False)
    features, labels = np.concatenate(features), np.concatenate(labels)
    if labels.ndim == 2:
        assert labels.dtype == np.float32 and set(np.unique(labels)) <= {0.0, 1.0}
        np.testing.assert_array_equal(labels.sum(axis=1), 1.0)
        labels = labels.argmax(axis=1).astype(np.int32)
    return features, labels


def to_float(audio_int16):
    return tf.cast(audio_int16, tf.float32) / 32768.0


@pytest.fixture(scope="module")
def clean_features(demo_audio, settings):
    """Features of each demo clip with no augmentation, keyed by training label."""
    features = compute_features(to_float(demo_audio), settings).numpy()
    by_label = {label: features[i] for i, label in enumerate(WANTED_CLIPS)}
    by_label[UNKNOWN] = features[3]
    return by_label


def rows_equal_to_clean(features, labels, clean_features):
    """For each non-silence row: does it equal its clip's unaugmented features?"""
    return np.array([
        np.allclose(row, clean_features[label], rtol=1e-5, atol=1e-4)
        for row, label in zip(features, labels, strict=False) if label != SILENCE
    ])


def test_training_batches_have_the_model_shape_and_labels_in_range(demo_audio, background, settings):
    dataset = training_dataset(training_audio(demo_audio, background), settings, recipe_augmentation(), 16, 10, 10, 1)
    assert dataset.element_spec[0].shape.as_list() == [16, 98, 40, 1]
    assert dataset.element_spec[1].shape.as_list() == [16, NUM_LABELS] and dataset.element_spec[1].dtype == tf.float32
    features, labels = first_batches(dataset, 4)
    assert features.shape == (64, 98, 40, 1) and features.dtype == np.float32
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < NUM_LABELS
    assert np.all(np.isfinite(features))


def test_without_augmentation_training_inputs_equal_evaluation_inputs(demo_audio, background, settings, clean_features):
    """Control for the next test: with shift, noise and silence off, rows are the clean clips."""
    dataset = training_dataset(training_audio(demo_audio, background), settings, NO_AUGMENTATION, 32, 0, 25, 1)
    features, labels = first_batches(dataset, 2)
    assert set(labels) == {UNKNOWN, *WANTED_CLIPS}
    assert rows_equal_to_clean(features, labels, clean_features).all()


def test_augmentation_changes_training_inputs(demo_audio, background, settings, clean_features):
    dataset = training_dataset(training_audio(demo_audio, background), settings, recipe_augmentation(), 32, 0, 25, 1)
    features, labels = first_batches(dataset, 4)
    # Each row is shifted by up to +-100 ms and mostly gets noise: hardly any row stays clean.
    assert rows_equal_to_clean(features, labels, clean_features).mean() < 0.1
    # Every time a clip is drawn again it gets another shift and noise.
    for label in set(labels):
        rows = features[labels == label]
        assert len(rows) > 2, label
        same = [np.allclose(rows[i], rows[j], atol=1e-4) for i in range(len(rows)) for j in range(i)]
        assert np.mean(same) < 0.1, label


@pytest.mark.parametrize("augmentation", [
    recipe_augmentation(background_volume=0.0, background_frequency=0.0),  # time shift only
    recipe_augmentation(time_shift_ms=0.0, background_frequency=1.0),  # noise only
])
def test_each_augmentation_alone_changes_training_inputs(demo_audio, background, settings, clean_features, augmentation):
    dataset = training_dataset(training_audio(demo_audio, background), settings, augmentation, 32, 0, 25, 1)
    features, labels = first_batches(dataset, 1)
    assert rows_equal_to_clean(features, labels, clean_features).mean() < 0.1


def test_evaluation_inputs_never_change(demo_audio, settings):
    labels = np.array([*WANTED_CLIPS, UNKNOWN], np.int32)
    dataset = evaluation_dataset(demo_audio, labels, settings, batch_size=3)
    first, first_labels = first_batches(dataset, 2)
    second, second_labels = first_batches(dataset, 2)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first_labels, labels)
    np.testing.assert_array_equal(second_labels, labels)
    expected = compute_features(to_float(demo_audio), settings).numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-4)


def test_augment_empties_the_foreground_of_silence_rows():
    rng = np.random.default_rng(3)
    audio = tf.constant(rng.uniform(-0.5, 0.5, (6, 1600)).astype(np.float32))
    labels = tf.constant([SILENCE, 2, SILENCE, 3, UNKNOWN, SILENCE], tf.int32)
    settings = recipe_augmentation(time_shift_ms=0.0, background_volume=0.5, background_frequency=1.0)
    silent_room = tf.zeros([RATE], tf.float32)
    for background in (silent_room, tf.zeros([0], tf.float32)):
        out = augment(audio, labels, background, settings, SEED).numpy()
        is_silence = labels.numpy() == SILENCE
        assert not out[is_silence].any()
        np.testing.assert_array_equal(out[~is_silence], audio.numpy()[~is_silence])
    # With real noise, silence rows hold noise only: never louder than the noise itself.
    noise = tf.constant(rng.uniform(-0.05, 0.05, RATE).astype(np.float32))
    out = augment(audio, labels, noise, settings, SEED).numpy()
    assert np.abs(out[is_silence]).max() <= 0.05
    assert np.abs(out[~is_silence]).max() > 0.4


def test_augment_keeps_audio_in_range():
    loud = tf.fill([4, 1600], 0.99)
    noise = tf.ones([RATE], tf.float32)
    settings = recipe_augmentation(time_shift_ms=0.0, background_volume=1.0, background_frequency=1.0)
    out = augment(loud, tf.constant([2, 3, 4, 2], tf.int32), noise, settings, SEED).numpy()
    assert out.max() <= 1.0 and out.min() >= 0.99


def test_silence_rows_of_training_batches_have_no_foreground(demo_audio, settings):
    no_noise = training_audio(demo_audio, np.zeros(0, np.float32))
    dataset = training_dataset(no_noise, settings, recipe_augmentation(), 64, 30, 10, 2)
    features, labels = first_batches(dataset, 1)
    assert (labels == SILENCE).any()
    zeros = compute_features(tf.zeros([1, settings.desired_samples]), settings).numpy()[0]
    for row in features[labels == SILENCE]:
        np.testing.assert_allclose(row, zeros, atol=1e-5)


@pytest.mark.parametrize("silence_percentage, unknown_percentage", [(10.0, 20.0), (0.0, 10.0), (25.0, 0.0)])
def test_label_mix_follows_the_percentages(silence_percentage, unknown_percentage):
    """Silence and unknown come at their percentage of the wanted clips (loose bounds, 3000 samples)."""
    short = feature_settings(RATE, 100, 30.0, 10.0, 10, "mfcc")  # small clips: only labels matter here
    rng = np.random.default_rng(4)
    audio = TrainingAudio(
        wanted_audio=rng.integers(-1000, 1000, (30, short.desired_samples), dtype=np.int16),
        wanted_labels=np.repeat(np.arange(2, 5, dtype=np.int32), 10),
        unknown_audio=rng.integers(-1000, 1000, (10, short.desired_samples), dtype=np.int16),
        unknown_label=UNKNOWN,
        silence_label=SILENCE,
        background=np.zeros(0, np.float32),
        label_count=NUM_LABELS,
    )
    dataset = training_dataset(
        audio, short, recipe_augmentation(time_shift_ms=10.0), 100, silence_percentage, unknown_percentage, 5
    )
    _, labels = first_batches(dataset, 30)
    total = 100 + silence_percentage + unknown_percentage
    assert np.mean(labels == SILENCE) == pytest.approx(silence_percentage / total, abs=0.03)
    assert np.mean(labels == UNKNOWN) == pytest.approx(unknown_percentage / total, abs=0.03)
    wanted_counts = np.bincount(labels, minlength=NUM_LABELS)[2:]
    assert wanted_counts.min() > 0.8 * wanted_counts.mean()


def test_pipeline_end_to_end_on_the_demo_dataset(tmp_path):
    config = load_config({"data_dir": str(DEMO), "batch_size": 100})
    settings = settings_from_config(config)
    prepared = train.prepare_data(config, settings, DEMO, tmp_path / "no_split_files")
    labels = prepared.index.labels
    assert len(prepared.training.wanted_audio) == len(prepared.training.wanted_labels) > 0
    assert len(prepared.training.unknown_audio) > 0
    assert len(prepared.training.background) >= settings.desired_samples

    augmentation = augment_settings_from_config(config, settings, prepared.training.silence_label)
    dataset = training_dataset(
        prepared.training, settings, augmentation, config.batch_size,
        config.silence_percentage, config.unknown_percentage, config.random_seed,
    )
    features, batch_labels = first_batches(dataset, 4)
    assert features.shape == (400, 98, 40, 1)
    assert np.all(np.isfinite(features))
    assert set(batch_labels) == set(range(len(labels)))

    evaluated = 0
    for split, (audio, split_labels) in prepared.evaluation.items():
        if not len(audio):
            continue
        eval_features, eval_labels = first_batches(evaluation_dataset(audio, split_labels, settings, 256), 100)
        assert eval_features.shape == (len(audio), 98, 40, 1), split
        assert np.all(np.isfinite(eval_features)), split
        np.testing.assert_array_equal(eval_labels, split_labels)
        assert set(eval_labels) <= set(range(len(labels)))
        evaluated += len(audio)
    assert evaluated > 0


def _write_clip(path: Path, value: float, rate: int = RATE, samples: int = 4000, subtype: str = "PCM_16") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.full(samples, value, np.float32), rate, subtype=subtype)


def _split_lists(root: Path, splits: dict[str, list[str]]) -> Path:
    folder = root / "splits"
    folder.mkdir()
    for split, filename in data.SPLIT_FILES.items():
        (folder / filename).write_text("".join(f"{line}\n" for line in splits.get(split, [])))
    return folder


def test_unusable_training_clips_are_skipped_counted_and_labels_stay_aligned(tmp_path, caplog):
    """A corrupt clip and a 1 Hz decode bomb among good clips: both skipped, named, and every
    remaining row keeps its own label ("yes" clips are positive, "no" clips negative)."""
    root = tmp_path / "data"
    training_clips = []
    for i in range(3):
        for word, value in (("yes", 0.5), ("no", -0.5)):
            _write_clip(root / word / f"s{i}_nohash_0.wav", value)
            training_clips.append(f"{word}/s{i}_nohash_0.wav")
    (root / "yes" / "corrupt_nohash_0.wav").write_bytes(b"RIFF\x10\0\0\0WAVEnot a wav at all")
    _write_clip(root / "no" / "bomb_nohash_0.wav", 0.0, rate=8000, samples=4000, subtype="PCM_U8")
    bomb = bytearray((root / "no" / "bomb_nohash_0.wav").read_bytes())
    bomb[24:32] = struct.pack("<II", 1, 1)  # the header now says 1 Hz: 4000 s of audio
    (root / "no" / "bomb_nohash_0.wav").write_bytes(bytes(bomb))
    _write_clip(root / data.BACKGROUND_NOISE_DIR / "noise.wav", 0.01, samples=2 * RATE)
    _write_clip(root / data.BACKGROUND_NOISE_DIR / "hours.wav", 0.01, rate=1000, samples=1000 * 601, subtype="PCM_U8")
    training_clips[3:3] = ["yes/corrupt_nohash_0.wav", "no/bomb_nohash_0.wav"]
    splits = _split_lists(tmp_path, {"training": training_clips, "validation": ["yes/s0_nohash_0.wav",
                                                                                "no/bomb_nohash_0.wav"]})
    config = load_config({"data_dir": str(root), "wanted_words": "yes,no", "silence_percentage": 0,
                          "unknown_percentage": 0})
    settings = settings_from_config(config)

    prepared = train.prepare_data(config, settings, root, splits)

    skipped = prepared.skipped_summary()
    assert skipped["count"] == 3
    files = {example["file"]: example["error"] for example in skipped["examples"]}
    assert set(files) == {"yes/corrupt_nohash_0.wav", "no/bomb_nohash_0.wav", f"{data.BACKGROUND_NOISE_DIR}/hours.wav"}
    assert "sample rate of 1 Hz" in files["no/bomb_nohash_0.wav"]
    assert "longest accepted is 600 s (the bound on one background-noise file" in files[
        f"{data.BACKGROUND_NOISE_DIR}/hours.wav"]
    audio, labels = prepared.training.wanted_audio, prepared.training.wanted_labels
    assert len(audio) == len(labels) == 6
    yes, no = prepared.index.labels.index("yes"), prepared.index.labels.index("no")
    assert list(labels == yes) == list(audio.max(axis=1) > 0) and list(labels == no) == list(audio.min(axis=1) < 0)
    validation_audio, validation_labels = prepared.evaluation["validation"]
    assert list(validation_labels) == [yes] and validation_audio.max() > 0
    assert len(prepared.training.background) == 2 * RATE
    assert "Skipped 3 files of" in caplog.text and "Skipped clip no/bomb_nohash_0.wav" in caplog.text


def test_a_training_split_without_any_usable_clip_is_refused(tmp_path):
    root = tmp_path / "data"
    for word in ("yes", "no"):
        (root / word).mkdir(parents=True)
        (root / word / "s0_nohash_0.wav").write_bytes(b"not audio")
    splits = _split_lists(tmp_path, {"training": ["yes/s0_nohash_0.wav", "no/s0_nohash_0.wav"]})
    config = load_config({"data_dir": str(root), "wanted_words": "yes,no"})
    with pytest.raises(data.DataError, match=f"no usable clip left in the training split of {root}"):
        train.prepare_data(config, settings_from_config(config), root, splits)
