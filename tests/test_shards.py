"""The prepared dataset: TFRecord shards that round-trip every clip, a cache keyed by content that
never uses a killed preparation, and training pipelines that stream from the shards."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from speechclas import data, pipeline, shards, train
from speechclas.audio import AudioLimits
from speechclas.config import load_config
from speechclas.features import settings_from_config
from speechclas.limits import Limits

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
RATE = 16000
BOUNDS = AudioLimits.from_limits(Limits.defaults())


@pytest.fixture
def folder(tmp_path):
    """Three words of six demo speakers, one clip at 8 kHz stereo, one that is not audio, and noise."""
    out = tmp_path / "audios"
    for word in ("yes", "no", "bed"):
        (out / word).mkdir(parents=True)
        for clip in sorted((DEMO / word).iterdir())[:6]:
            shutil.copy(clip, out / word / clip.name)
    samples, _ = soundfile.read(sorted((DEMO / "yes").iterdir())[7], dtype="float32")
    soundfile.write(out / "yes" / "stereo_nohash_0.wav", np.stack([samples[::2], samples[::2] * 0.5], axis=1), 8000)
    (out / "no" / "broken_nohash_0.wav").write_bytes(b"RIFF....WAVEfmt not really")
    shutil.copytree(DEMO / "_background_noise_", out / "_background_noise_")
    return out


def index_of(folder, validation=25, testing=25):
    return data.index_dataset(folder, ["yes", "no"], validation, testing)


def prepare(cache, index, jobs=1, **kwargs):
    """In this process (jobs=1), where a test can count the clips decoded."""
    return shards.prepare(cache, index, RATE, RATE, BOUNDS, jobs=jobs, progress=False, **kwargs)


def test_every_clip_and_label_reads_back_bit_for_bit(folder, tmp_path):
    index = index_of(folder)
    cache = shards.ShardCache(tmp_path / "cache", 10**10)
    with prepare(cache, index, jobs=2, shard_clips=5) as prepared:  # decoded by a pool of 2 processes
        read = {clip.path: clip for split in data.SPLITS
                for clip in shards.read_clips(prepared.split_files(split), RATE)}
        assert [clip.path for clip in prepared.skipped] == ["no/broken_nohash_0.wav"]
        assert len(prepared.files["training"]) > 1  # 5 clips a shard
    for split in data.SPLITS:
        for example in index.splits[split]:
            if example.path == "no/broken_nohash_0.wav":
                assert example.path not in read
                continue
            clip = read.pop(example.path)
            expected = data.decode_clip(folder, example.path, RATE, RATE, BOUNDS)
            assert clip.audio.dtype == np.int16 and np.array_equal(clip.audio, expected), example.path
            assert (clip.label, clip.split, clip.speaker) == (example.word, split, data.speaker_of(example.path))
    assert read == {}  # nothing more than the folder's clips


def test_a_later_preparation_reuses_the_shards_and_a_changed_clip_makes_a_new_version(folder, tmp_path, monkeypatch):
    cache = shards.ShardCache(tmp_path / "cache", 10**10)
    with prepare(cache, index_of(folder)) as first:
        pass
    decoded = []
    real_decode = shards.decode_clip
    monkeypatch.setattr(shards, "decode_clip", lambda *args: decoded.append(args[1]) or real_decode(*args))
    with prepare(cache, index_of(folder)) as again:
        assert again.folder == first.folder and decoded == []
    with prepare(cache, index_of(folder, validation=10)) as other_split:  # another split, another version
        assert other_split.folder != first.folder
    decoded.clear()

    changed = folder / "yes" / sorted(os.listdir(folder / "yes"))[0]
    samples, rate = soundfile.read(changed, dtype="float32")
    soundfile.write(changed, samples * 0.5, rate)
    with prepare(cache, index_of(folder)) as after:
        assert after.folder != first.folder
        assert len(decoded) == sum(len(index_of(folder).splits[split]) for split in data.SPLITS)
        clip = next(c for s in data.SPLITS for c in shards.read_clips(after.split_files(s), RATE)
                    if c.path == f"yes/{changed.name}")
        assert np.array_equal(clip.audio, data.decode_clip(folder, clip.path, RATE, RATE, BOUNDS))
    assert first.folder.is_dir()  # the old version stays until the cache needs room


SLOW_PREPARATION = """
import sys, time
from pathlib import Path
from speechclas import data, shards
from speechclas.audio import AudioLimits
from speechclas.limits import Limits
real = shards.decode_clip
shards.decode_clip = lambda *args: time.sleep(0.2) or real(*args)
index = data.index_dataset(Path(sys.argv[1]), ["yes", "no"], 25, 25)
with shards.prepare(shards.ShardCache(Path(sys.argv[2]), 10**10), index, 16000, 16000,
                    AudioLimits.from_limits(Limits.defaults()), jobs=1, shard_clips=2, progress=False):
    pass
"""


def test_a_killed_preparation_is_never_used_and_its_leftovers_go(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", SLOW_PREPARATION, str(folder), str(cache_dir)],
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.monotonic() + 60
        while not list(cache_dir.glob(".*.partial-*/*.tfrecord")):
            assert process.poll() is None and time.monotonic() < deadline, "the preparation never wrote a shard"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    cache = shards.ShardCache(cache_dir, 10**10)
    key = shards.dataset_key(index_of(folder), RATE, RATE, BOUNDS)
    assert not cache.is_complete(key)  # the partial folder looks like nothing usable
    with prepare(cache, index_of(folder)) as prepared:
        assert prepared.folder == cache_dir / key
        total = sum(prepared.clip_count(split) for split in data.SPLITS)
        assert total == sum(len(index_of(folder).splits[s]) for s in data.SPLITS) - 1  # all but the broken clip
    assert not list(cache_dir.glob(".*partial*"))


# --- streaming from the shards -------------------------------------------------------


def streamed(folder, tmp_path, **overrides):
    config = load_config({"data_dir": str(folder), "wanted_words": "yes,no", "validation_percentage": 25,
                          "testing_percentage": 25, "data_loading": "stream", **overrides})
    settings = settings_from_config(config)
    limits = Limits.defaults().replace(shard_cache_dir=str(tmp_path / "cache"))
    return config, settings, train.prepare_data(config, settings, folder, tmp_path / "no-lists", limits)


def raw_batches(source, count, batch=16, part=None, silence=10.0, unknown=30.0):
    settings = settings_from_config(load_config({}))
    augment = pipeline.AugmentSettings(0, 0.0, 0.0, source.silence_label)
    dataset = pipeline.training_dataset(source, settings, augment, batch, silence, unknown, 3,
                                        part=part or pipeline.InputShard(),
                                        augment_in_pipeline=False)
    return [(audio.numpy(), labels.numpy()) for audio, labels, _ in dataset.take(count)]


def digest(audio):
    return hashlib.sha1(audio.tobytes()).hexdigest()


def test_streamed_batches_are_the_folder_clips_with_their_labels_at_the_shares(folder, tmp_path):
    _, _, prepared = streamed(folder, tmp_path)
    assert prepared.streamed and isinstance(prepared.training, pipeline.ShardSource)
    labels = prepared.index.labels
    truth = {digest(c.audio): labels.index(c.label) if c.label in labels else 1
             for c in shards.read_clips(prepared.training.files, RATE)}
    seen = Counter()
    for audio, batch_labels in raw_batches(prepared.training, 40):
        for row, label in zip(audio, batch_labels, strict=True):
            if label == prepared.training.silence_label:
                assert not row.any()
            else:
                assert truth[digest(row)] == label
            seen[labels[label]] += 1
    total = sum(seen.values())
    wanted = seen["yes"] + seen["no"]
    assert abs(seen["_silence_"] / wanted - 0.10) < 0.05 and abs(seen["_unknown_"] / wanted - 0.30) < 0.08
    assert len({digest(row) for audio, _ in raw_batches(prepared.training, 40) for row in audio}) > 0.5 * len(truth)
    assert total == 640


def test_two_input_pipelines_read_disjoint_clips(folder, tmp_path):
    for shard_clips in (3, 10_000):  # several files a pipeline: by file; one file: by record
        _, _, prepared = streamed(folder, tmp_path / str(shard_clips))
        source = prepared.training
        if shard_clips == 3:
            with shards.prepare(shards.ShardCache(tmp_path / "small", 10**10), prepared.index, RATE, RATE, BOUNDS,
                                shard_clips=3, progress=False) as small:
                source = pipeline.ShardSource(**{
                    **source.__dict__, "files": tuple(small.split_files("training")),
                    "file_labels": tuple(frozenset(labels) for labels in small.file_labels("training"))})
        halves = [{digest(row) for audio, labels in raw_batches(source, 30, part=pipeline.InputShard(2, i),
                                                                silence=0.0)
                   for row in audio} for i in (0, 1)]
        every = {digest(c.audio) for c in shards.read_clips(source.files, RATE)}
        assert halves[0] and halves[1] and not halves[0] & halves[1]
        assert halves[0] | halves[1] == every


def test_a_kind_with_no_clip_in_a_pipelines_shards_ends_instead_of_hanging(folder, tmp_path):
    """An input pipeline whose records hold no unknown word (a worker's share of a small set)
    draws wanted words and silence; its filter never searches the endless stream."""
    _, _, prepared = streamed(folder, tmp_path)
    only_wanted = dataclasses.replace(prepared.training, has_unknown=True, labels=("_silence_", "_unknown_", "yes",
                                                                                   "no", "bed"))
    labels = {label for _, batch_labels in raw_batches(only_wanted, 5) for label in batch_labels}
    assert labels <= {0, 2, 3, 4} and {2, 3, 4} <= labels  # "bed" is a wanted word here: no _unknown_ left


def test_a_streamed_evaluation_set_holds_every_wanted_clip_and_its_shares(folder, tmp_path):
    _, _, prepared = streamed(folder, tmp_path, silence_percentage=20, unknown_percentage=50)
    for split in data.SPLITS:
        audio, labels = pipeline.take_clips(prepared.evaluation_elements(split), 10_000)
        counts = Counter(labels.tolist())
        wanted = prepared.shards.clip_count(split, ("yes", "no"))
        assert counts[2] + counts[3] == wanted  # every wanted clip
        assert counts[0] == int(np.ceil(wanted * 0.2))  # silence at its share
        assert counts[1] <= prepared.shards.clip_count(split) - wanted
        assert abs(len(labels) - prepared.evaluation_size(split)) <= 2
        again, _ = pipeline.take_clips(prepared.evaluation_elements(split), 10_000)
        assert np.array_equal(audio, again)  # a fixed set: the same clips and noise every pass


def test_a_streamed_training_beats_chance_and_its_exports_agree(folder, tmp_path):
    models = tmp_path / "models"
    config = load_config({"data_dir": str(DEMO), "models_dir": str(models), "data_loading": "stream",
                          "model_architecture": "tiny_conv", "how_many_training_steps": "80,20",
                          "learning_rate": "0.002,0.0005", "batch_size": 50, "eval_step_interval": 100,
                          "shuffle_buffer": 64, "streaming_minutes": 0.5, "streaming_noise_minutes": 0.5})
    limits = Limits.defaults().replace(shard_cache_dir=str(tmp_path / "cache"))
    result = train.train(config, progress=False, limits=limits)
    metrics = json.loads(result.run.metrics_path.read_text())
    chance = 1 / len(metrics["labels"])
    assert metrics["testing"]["accuracy"] > 2.5 * chance
    accuracies = {name: export["test_accuracy"] for name, export in metrics["exports"].items()}
    assert abs(accuracies["model.pb"] - metrics["testing"]["accuracy"]) < 0.03, accuracies
    assert "streaming" in metrics and result.run.is_finished()


def test_speechclas_prepare_writes_the_shards_a_training_then_reuses(folder, tmp_path, monkeypatch, capsys):
    from speechclas import cli

    monkeypatch.setenv("SPEECHCLAS_SHARD_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.prepare_main([str(folder), "wanted_words=yes,no", "validation_percentage=25",
                             "testing_percentage=25", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_clips"] == 1 and sum(summary["clips"].values()) == len(list(folder.glob("*/*.wav"))) - 5
    decoded = []
    real_decode = shards.decode_clip
    monkeypatch.setattr(shards, "decode_clip", lambda *args: decoded.append(args[1]) or real_decode(*args))
    _, _, prepared = streamed(folder, tmp_path)
    assert str(prepared.shards.folder) == summary["shards"] and decoded == []
    assert cli.prepare_main([str(tmp_path / "nowhere")]) == 2
