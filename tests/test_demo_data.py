"""Checks the shipped demo dataset (data/demo) and the script that makes it.

The demo data stands in for speech_commands in training and API tests, so it
must keep that corpus' layout and format.  Only the last test needs espeak-ng.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SCRIPT = ROOT / "scripts" / "make_demo_data.py"
WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
NOISE = "_background_noise_"
CLIP_NAME = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")


def word_dirs(root):
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != NOISE)


OTHER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
               "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow"]


def test_every_keyword_the_other_speech_commands_words_and_near_misses_are_present():
    from speechclas import lexicon

    names = {p.name for p in word_dirs(DEMO)}
    assert set(WORDS) <= names and set(OTHER_WORDS) <= names, "the demo teaches refusal with the 20 other words"
    near = names - set(WORDS) - set(OTHER_WORDS)
    assert len(near) >= 10, "near-misses of the keywords, as more unknown words"
    lex = lexicon.load_lexicon()
    keyword_sounds = set(lexicon.keyword_sounds(WORDS, lex).values())
    assert not [word for word in near if lexicon.sounds(lex.phonemes[word]) in keyword_sounds], "a homophone"


def test_the_demo_stays_small():
    assert sum(path.stat().st_size for path in DEMO.rglob("*") if path.is_file()) < 25 * 2**20


def test_clips_are_at_most_one_second_16k_mono_pcm16_with_speech_commands_names():
    for folder in word_dirs(DEMO):
        clips = sorted(folder.iterdir())
        assert clips, folder
        for clip in clips:
            assert CLIP_NAME.match(clip.name), clip
            info = sf.info(clip)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), clip
            assert 1600 <= info.frames <= 16000, clip


def test_speakers_say_every_word_and_differ():
    speakers = {
        folder.name: {clip.name.split("_nohash_")[0] for clip in folder.iterdir()}
        for folder in word_dirs(DEMO) if folder.name in WORDS + OTHER_WORDS
    }
    all_speakers = set.union(*speakers.values())
    assert len(all_speakers) >= 2
    assert all(s == all_speakers for s in speakers.values()), "a speaker misses a word"
    clips = [sf.read(c, dtype="int16")[0] for c in sorted((DEMO / "yes").iterdir())]
    assert len({c.tobytes() for c in clips}) == len(clips), "identical clips"


def test_speech_sits_inside_the_clip_over_a_noise_floor():
    for clip in sorted(DEMO.glob("*/*_nohash_*.wav")):
        audio, _ = sf.read(clip, dtype="float32")
        usable = len(audio) // 160 * 160
        frames = np.sqrt(np.mean(audio[:usable].reshape(-1, 160) ** 2, axis=1))  # 10 ms frames
        assert np.min(frames) > 0, "digital silence"
        assert frames[-1] < 0.1 * np.max(frames), f"word cut at the end: {clip}"


def test_default_hash_split_holds_out_several_speakers():
    from speechclas.data import which_set

    speakers = {clip.name for clip in (DEMO / "yes").iterdir()}
    splits = [which_set(name, 10.0, 10.0) for name in speakers]
    assert splits.count("validation") >= 3 and splits.count("testing") >= 3, splits


def test_background_noise_has_long_clips():
    clips = sorted((DEMO / NOISE).glob("*.wav"))
    assert len(clips) >= 3
    for clip in clips:
        info = sf.info(clip)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), clip
        assert info.frames >= 5 * 16000, clip


def test_readme_says_how_it_was_made():
    text = (DEMO / "README.md").read_text()
    assert "make_demo_data.py" in text and "Apache-2.0" in text


def _make_demo_data_module():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_voice_options_choose_the_pool_and_default_to_the_shipped_one():
    script = _make_demo_data_module()
    default = script.parse_args([])
    assert (default.voices, default.variants) == (list(script.VOICES), list(script.VARIANTS))
    held_out = script.parse_args(["--voices", "de, fr-fr", "--exclude-variants", "klatt,klatt2"])
    assert held_out.voices == ["de", "fr-fr"]
    assert held_out.variants == [v for v in script.VARIANTS if v not in ("klatt", "klatt2")]
    speakers = script.choose_speakers(12, 5, held_out.voices, ["m1", "f2"])
    assert {s.voice for s in speakers} == {"de", "fr-fr"} and {s.variant for s in speakers} <= {"m1", "f2"}
    assert script.choose_speakers(12, 5) == script.choose_speakers(12, 5, script.VOICES, script.VARIANTS)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_script_writes_the_speech_commands_layout_reproducibly(tmp_path):
    def make(out, jobs):
        command = [
            sys.executable, str(SCRIPT), "--out", str(out), "--speakers", "2", "--words",
            "yes,no", "--unknown-words", "", "--near-misses", "0", "--noise-seconds", "1", "--jobs", str(jobs),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)

    out, again = tmp_path / "demo", tmp_path / "again"
    make(out, jobs=1)
    make(again, jobs=2)
    assert {p.name for p in out.iterdir()} == {"yes", "no", NOISE, "README.md"}
    for word in ("yes", "no"):
        clips = sorted((out / word).iterdir())
        assert len(clips) == 2 and all(CLIP_NAME.match(c.name) for c in clips)
        assert all(1600 <= sf.info(c).frames <= 16000 for c in clips)
    assert {c.name for c in (out / "yes").iterdir()} == {c.name for c in (out / "no").iterdir()}
    assert len(list((out / NOISE).glob("*.wav"))) >= 3
    for clip in out.glob("*/*.wav"):
        assert clip.read_bytes() == (again / clip.relative_to(out)).read_bytes(), clip
