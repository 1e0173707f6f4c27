"""Indexing a folder of clips, the speaker-hash split, split files, and the
evaluation sets with their silence and unknown entries."""

import hashlib
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile

from speechclas import data
from speechclas.data import (
    BACKGROUND_NOISE_DIR,
    SILENCE_LABEL,
    SPLITS,
    UNKNOWN_LABEL,
    DataError,
    DatasetIndex,
    Example,
    evaluation_examples,
    index_dataset,
    speaker_of,
    which_set,
    write_split_lists,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
DEMO_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
RATE = 16000


def write_wav(path, samples=160, value=0.1):
    """A tiny 16-bit wav; content does not matter for indexing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.full(samples, value, np.float32), RATE, subtype="PCM_16")
    return path


def make_dataset(root, words, speakers, takes=1):
    """root/<word>/<speaker>_nohash_<take>.wav for every combination (one tiny clip copied)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.full(160, 0.1, np.float32), RATE, format="WAV", subtype="PCM_16")
    for word in words:
        (root / word).mkdir(parents=True, exist_ok=True)
        for speaker in speakers:
            for take in range(takes):
                (root / word / f"{speaker}_nohash_{take}.wav").write_bytes(buffer.getvalue())
    return root


def speakers(count, prefix="s"):
    return [hashlib.md5(f"{prefix}{i}".encode()).hexdigest()[:8] for i in range(count)]


def split_of_each_file(index):
    return {e.path: split for split in SPLITS for e in index.splits[split]}


def assert_speakers_in_one_set(index):
    sets_of = defaultdict(set)
    for split in SPLITS:
        for example in index.splits[split]:
            sets_of[speaker_of(example.path)].add(split)
    assert sets_of
    mixed = {speaker: sets for speaker, sets in sets_of.items() if len(sets) > 1}
    assert not mixed


def reference_which_set(filename, validation_percentage, testing_percentage):
    """TF speech_commands' input_data.which_set, so a split made there is kept here."""
    base_name = Path(filename).name
    hash_name = re.sub(r"_nohash_.*$", "", base_name)
    hashed = hashlib.sha1(hash_name.encode("utf-8")).hexdigest()
    percentage = (int(hashed, 16) % (2**27 - 1 + 1)) * (100.0 / (2**27 - 1))
    if percentage < validation_percentage:
        return "validation"
    if percentage < testing_percentage + validation_percentage:
        return "testing"
    return "training"


def test_which_set_matches_the_speech_commands_recipe():
    names = [f"{word}/{speaker}_nohash_{take}.wav" for word in ("yes", "cat") for speaker in speakers(300)
             for take in (0, 3)]
    ours = [which_set(name, 10, 10) for name in names]
    assert ours == [reference_which_set(name, 10, 10) for name in names]
    assert set(ours) == set(SPLITS)


def test_which_set_depends_on_the_speaker_only():
    for speaker in speakers(200):
        sets = {which_set(f"{word}/{speaker}_nohash_{take}.wav", 10, 10) for word in ("yes", "bed") for take in range(5)}
        assert len(sets) == 1, speaker
    assert speaker_of("yes/0a7c2a8d_nohash_3.wav") == "0a7c2a8d"


def test_which_set_follows_the_percentages():
    names = [f"{speaker}_nohash_0.wav" for speaker in speakers(3000)]
    counts = {split: 0 for split in SPLITS}
    for name in names:
        counts[which_set(name, 20, 10)] += 1
    assert 0.17 < counts["validation"] / len(names) < 0.23
    assert 0.07 < counts["testing"] / len(names) < 0.13
    assert {which_set(name, 0, 0) for name in names} == {"training"}


def test_adding_files_never_moves_old_ones(tmp_path):
    words = ("yes", "no")
    make_dataset(tmp_path, (*words, "cat"), speakers(40), takes=2)
    before = split_of_each_file(index_dataset(tmp_path, words, 15, 15))
    assert set(before.values()) == set(SPLITS)

    make_dataset(tmp_path, (*words, "cat", "dog"), speakers(40, prefix="new"), takes=2)  # new speakers, new word
    make_dataset(tmp_path, words, speakers(40)[:10], takes=4)  # more takes of old speakers
    after_index = index_dataset(tmp_path, words, 15, 15)
    after = split_of_each_file(after_index)

    assert len(after) > len(before)
    assert {path: after[path] for path in before} == before
    assert_speakers_in_one_set(after_index)


def test_a_speaker_is_never_in_two_sets_on_a_synthetic_set(tmp_path):
    make_dataset(tmp_path, ("yes", "no", "bed"), speakers(80), takes=3)
    index = index_dataset(tmp_path, ("yes", "no"), 10, 10)
    assert all(index.splits[split] for split in SPLITS)
    assert_speakers_in_one_set(index)


def test_a_speaker_is_never_in_two_sets_on_the_demo_data():
    index = index_dataset(DEMO, DEMO_WORDS, 10, 10)
    assert index.splits["training"]
    assert_speakers_in_one_set(index)


def test_split_files_override_the_hash(tmp_path):
    data_dir = make_dataset(tmp_path / "audio", ("yes", "no", "cat"), speakers(6), takes=1)
    hashed = split_of_each_file(index_dataset(data_dir, ("yes", "no"), 10, 10))
    paths = sorted(hashed)
    # Every file in a set the hash did not choose (0/0% puts them all in training).
    chosen = {"training": paths[:10], "validation": paths[10:14], "testing": paths[14:]}
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    for split, filename in data.SPLIT_FILES.items():
        (splits_dir / filename).write_text("# made by hand\n" + "".join(f"{p}\n" for p in chosen[split]) + "\n")

    index = index_dataset(data_dir, ("yes", "no"), 0, 0, splits_dir=splits_dir)
    assert index.splits_dir == splits_dir  # recorded by the run (conf/data_source.json)
    assert {split: [e.path for e in index.splits[split]] for split in SPLITS} == chosen
    assert index.splits["testing"][0].word == Path(chosen["testing"][0]).parent.name
    # Without the files (or another folder) the hash decides.
    hashed_again = index_dataset(data_dir, ("yes", "no"), 0, 0, splits_dir=tmp_path / "none")
    assert split_of_each_file(hashed_again) == {path: "training" for path in paths}
    assert hashed_again.splits_dir is None


def test_write_split_lists_writes_the_three_files_and_they_reproduce_the_split(tmp_path):
    data_dir = make_dataset(tmp_path / "audio", ("yes", "no", "cat"), speakers(30), takes=2)
    index = index_dataset(data_dir, ("yes", "no"), 20, 20)
    out = tmp_path / "dataset_files"
    write_split_lists(index, out)
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt", "val.txt"]
    for split, filename in data.SPLIT_FILES.items():
        assert (out / filename).read_text().splitlines() == [e.path for e in index.splits[split]]
    again = index_dataset(data_dir, ("yes", "no"), 0, 0, splits_dir=out)
    assert again.splits == index.splits


@pytest.mark.parametrize("line", ["yes/nobody_nohash_0.wav", "../outside/x_nohash_0.wav", "loose.wav"])
def test_split_file_naming_a_missing_or_bad_file_is_refused(tmp_path, line):
    data_dir = make_dataset(tmp_path / "audio", ("yes", "no"), speakers(3))
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    (splits_dir / "train.txt").write_text(f"yes/{speakers(3)[0]}_nohash_0.wav\n")
    (splits_dir / "val.txt").write_text(f"{line}\n")
    (splits_dir / "test.txt").write_text("")
    with pytest.raises(DataError, match=re.escape("val.txt:1: ")) as caught:
        index_dataset(data_dir, ("yes", "no"), 10, 10, splits_dir=splits_dir)
    assert line in str(caught.value)


def test_read_split_list_is_the_one_parser_of_split_lists(tmp_path):
    listed = tmp_path / "test.txt"
    listed.write_text("yes/a_nohash_0.wav\n\n# a comment\n  no/b_nohash_1.wav  \n../x/y.wav\n/etc/passwd\nloose.wav\n")
    entries = data.read_split_list(listed)
    assert [(e.number, e.text) for e in entries] == [
        (1, "yes/a_nohash_0.wav"), (4, "no/b_nohash_1.wav"), (5, "../x/y.wav"), (6, "/etc/passwd"), (7, "loose.wav"),
    ]
    assert [e.example for e in entries[:2]] == [
        data.Example("yes/a_nohash_0.wav", "yes"), data.Example("no/b_nohash_1.wav", "no"),
    ]
    assert [e.example for e in entries[2:]] == [None, None, None]  # outside the data folder or no label
    listed.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="not a text file"):
        data.read_split_list(listed)
    with pytest.raises(DataError, match="cannot read the split list"):
        data.read_split_list(tmp_path / "missing.txt")


def test_missing_data_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist") as caught:
        index_dataset(tmp_path / "nowhere", ("yes", "no"), 10, 10)
    assert "nowhere" in str(caught.value)


def test_folder_without_wavs_is_refused(tmp_path):
    (tmp_path / "yes").mkdir()
    (tmp_path / "no").mkdir()
    (tmp_path / "no" / "notes.txt").write_text("not audio")
    write_wav(tmp_path / "loose_nohash_0.wav")  # not in a label folder
    write_wav(tmp_path / BACKGROUND_NOISE_DIR / "noise.wav")  # noise is not a clip
    with pytest.raises(DataError, match="no .wav files found"):
        index_dataset(tmp_path, ("yes", "no"), 10, 10)


def test_wanted_word_without_clips_is_refused_by_name(tmp_path):
    make_dataset(tmp_path, ("yes", "no"), speakers(3))
    (tmp_path / "up").mkdir()
    with pytest.raises(DataError, match="wanted words with no clips.*: up, stop$"):
        index_dataset(tmp_path, ("yes", "up", "no", "stop"), 10, 10)


def test_fewer_than_two_classes_is_refused(tmp_path):
    make_dataset(tmp_path, ("yes",), speakers(20))
    with pytest.raises(DataError, match="fewer than two classes"):
        index_dataset(tmp_path, ("yes",), 10, 10)
    # One word plus other words for _unknown_ is two classes.
    make_dataset(tmp_path, ("cat",), speakers(20))
    index = index_dataset(tmp_path, ("yes",), 10, 10)
    assert index.unknown("training")


def test_background_noise_is_not_a_label_and_other_folders_are_unknown(tmp_path):
    make_dataset(tmp_path, ("yes", "no", "cat", "dog"), speakers(20))
    write_wav(tmp_path / BACKGROUND_NOISE_DIR / "white_noise.wav", samples=RATE * 2)
    write_wav(tmp_path / BACKGROUND_NOISE_DIR / "pink_noise.wav", samples=RATE * 2)
    index = index_dataset(tmp_path, ("yes", "no"), 10, 10)

    assert index.labels == (SILENCE_LABEL, UNKNOWN_LABEL, "yes", "no")
    assert index.background_files == (f"{BACKGROUND_NOISE_DIR}/pink_noise.wav", f"{BACKGROUND_NOISE_DIR}/white_noise.wav")
    every = [e for split in SPLITS for e in index.splits[split]]
    assert len(every) == 4 * 20
    assert not [e for e in every if BACKGROUND_NOISE_DIR in e.path]
    unknown = index.labels.index(UNKNOWN_LABEL)
    assert index.label_index("cat") == index.label_index("dog") == unknown
    assert index.label_index("no") == 3
    for split in SPLITS:
        assert {e.word for e in index.unknown(split)} <= {"cat", "dog"}
        assert {e.word for e in index.wanted(split)} <= {"yes", "no"}
    assert {e.word for e in index.unknown("training")} == {"cat", "dog"}


def hand_made_index(wanted_count=40, unknown_count=30):
    """An index with a known number of wanted and unknown training clips."""
    examples = [Example(f"yes/w{i}_nohash_0.wav", "yes") for i in range(wanted_count // 2)]
    examples += [Example(f"no/w{i}_nohash_0.wav", "no") for i in range(wanted_count - wanted_count // 2)]
    examples += [Example(f"cat/u{i}_nohash_0.wav", "cat") for i in range(unknown_count)]
    return DatasetIndex(
        data_dir=Path("unused"),
        labels=data.labels_for(("yes", "no")),
        splits={"training": tuple(examples), "validation": (), "testing": ()},
        background_files=(),
    )


def test_evaluation_examples_add_silence_and_unknown_at_the_percentages():
    index = hand_made_index(wanted_count=40, unknown_count=30)
    paths, labels = evaluation_examples(index, "training", silence_percentage=10, unknown_percentage=25, seed=1)
    assert len(paths) == len(labels) == 40 + 10 + 4
    silence, unknown = index.labels.index(SILENCE_LABEL), index.labels.index(UNKNOWN_LABEL)
    assert [label for path, label in zip(paths, labels, strict=False) if path is None] == [silence] * 4
    unknown_paths = [path for path, label in zip(paths, labels, strict=False) if label == unknown]
    assert len(unknown_paths) == 10 and all(path.startswith("cat/") for path in unknown_paths)
    wanted = [(path, label) for path, label in zip(paths, labels, strict=False) if label not in (silence, unknown)]
    assert wanted == [(e.path, index.label_index(e.word)) for e in index.wanted("training")]


def test_evaluation_examples_are_deterministic_for_a_seed():
    index = hand_made_index()
    first = evaluation_examples(index, "training", 10, 25, seed=7)
    assert evaluation_examples(index, "training", 10, 25, seed=7) == first
    # Another seed draws other unknown clips.
    assert evaluation_examples(index, "training", 10, 25, seed=8)[0] != first[0]


def test_evaluation_examples_limits_unknown_to_what_exists_and_allows_zero():
    index = hand_made_index(wanted_count=40, unknown_count=5)
    paths, labels = evaluation_examples(index, "training", 0, 50, seed=1)
    assert len(paths) == len(labels) == 45 and None not in paths
    paths, _ = evaluation_examples(index, "training", 0, 0, seed=1)
    assert paths == [e.path for e in index.wanted("training")]
    assert evaluation_examples(index, "validation", 10, 10, seed=1) == ([], [])


def test_load_clips_centres_short_clips_and_gives_silence_for_none(tmp_path):
    write_wav(tmp_path / "yes" / "a_nohash_0.wav", samples=100, value=0.5)
    write_wav(tmp_path / "yes" / "b_nohash_0.wav", samples=400, value=-0.25)
    loaded = data.load_clips(tmp_path, ["yes/a_nohash_0.wav", None, "yes/b_nohash_0.wav"], RATE, 200)
    assert loaded.skipped == () and list(loaded.kept) == [0, 1, 2]
    clips = loaded.audio
    assert clips.dtype == np.int16 and clips.shape == (3, 200)
    np.testing.assert_allclose(clips[0, 50:150], 0.5 * 32767, atol=2)  # centred, as prediction places it
    assert not clips[0, :50].any() and not clips[0, 150:].any() and not clips[1].any()
    np.testing.assert_allclose(clips[2], -0.25 * 32767, atol=2)


def test_load_clips_skips_and_names_a_broken_clip(tmp_path, caplog):
    """One bad file leaves its row out (with its position, so labels stay aligned) instead of stopping."""
    write_wav(tmp_path / "yes" / "a_nohash_0.wav", samples=200, value=0.5)
    (tmp_path / "yes" / "bad_nohash_0.wav").write_bytes(b"this is not a wav file")
    write_wav(tmp_path / "yes" / "c_nohash_0.wav", samples=200, value=-0.5)
    loaded = data.load_clips(tmp_path, ["yes/a_nohash_0.wav", "yes/bad_nohash_0.wav", "yes/c_nohash_0.wav"], RATE, 200)
    assert list(loaded.kept) == [0, 2] and loaded.audio.shape == (2, 200)
    assert loaded.audio[0, 0] > 0 > loaded.audio[1, 0]
    assert [clip.path for clip in loaded.skipped] == ["yes/bad_nohash_0.wav"]
    assert "not a readable audio file" in loaded.skipped[0].reason
    assert "Skipped clip yes/bad_nohash_0.wav" in caplog.text


def test_evaluation_silence_is_fixed_background_noise_not_zeros():
    from speechclas.data import fill_silence

    background = np.random.default_rng(0).normal(0, 0.1, 50_000).astype(np.float32)
    audio = np.zeros((4, 16000), np.int16)
    audio[0] = 1000
    fill_silence(audio, np.array([1, 3]), background, seed=7)
    again = np.zeros((4, 16000), np.int16)
    again[0] = 1000
    fill_silence(again, np.array([1, 3]), background, seed=7)
    np.testing.assert_array_equal(audio, again)  # the same for every evaluation
    assert np.all(audio[0] == 1000) and np.all(audio[2] == 0)  # other rows untouched
    assert np.abs(audio[1]).max() > 0 and np.abs(audio[3]).max() > 0
