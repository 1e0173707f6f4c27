"""speechclas/voices.py: other engines' speakers, their clips, and `synthetic_voices` in a training.

The engines (flite, festival) are installed by scripts/test.sh; the tests that
run them are skipped only where they are missing.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from speechclas import confine, data, voices
from speechclas.config import ConfigError, load_config
from speechclas.features import settings_from_config
from speechclas.limits import Limits
from speechclas.train import prepare_data, train

REPO = Path(__file__).resolve().parents[1]
ENGINES_MISSING = bool(voices.missing_engines(list(voices.ENGINE_PROGRAMS)))
needs_engines = pytest.mark.skipif(ENGINES_MISSING, reason="needs flite and festival (scripts/install_voices.sh)")


def test_engine_speakers_are_distinct_reproducible_and_cover_every_voice():
    for engine, engine_voices in voices.ENGINE_VOICES.items():
        speakers = voices.choose_engine_speakers(engine, 12, seed=7)
        assert speakers == voices.choose_engine_speakers(engine, 12, seed=7)
        assert speakers != voices.choose_engine_speakers(engine, 12, seed=8)
        assert len({s.id for s in speakers}) == 12
        assert {s.voice for s in speakers} <= set(engine_voices)
        if len(engine_voices) <= 12:  # every voice when there are as many speakers
            assert {s.voice for s in speakers} == set(engine_voices)
        for speaker in speakers:
            assert voices.STRETCH_RANGE[0] <= speaker.stretch <= voices.STRETCH_RANGE[1]
            assert voices.LEVEL_DB_RANGE[0] <= speaker.level_db <= voices.LEVEL_DB_RANGE[1]
            if not engine_voices[speaker.voice]:
                assert speaker.pitch == 1.0  # a pitch the voice ignores would make two ids of one voice


@needs_engines
@pytest.mark.parametrize("engine, voice", [("espeak-ng", "en-us+m3"), ("flite", "kal16"), ("flite", "slt"),
                                           ("festival", "kal_diphone"),
                                           ("festival", "cmu_us_slt_arctic_hts")])
def test_engine_speakers_stretch_and_pitch_change_the_voice(engine, voice):
    def say(stretch, pitch):
        audio, _ = voices.synthesize_with_engine("seven", voices.EngineSpeaker(engine, voice, stretch, pitch, -6.0))
        return audio

    slow, fast = say(1.25, 1.0), say(0.8, 1.0)
    assert len(slow) > 1.2 * len(fast)
    if voices.ENGINE_VOICES[engine][voice]:
        _, rate = voices.synthesize_with_engine("seven", voices.EngineSpeaker(engine, voice, 1.0, 1.0, -6.0))
        low, high = _f0(say(1.0, 0.8), rate), _f0(say(1.0, 1.25), rate)
        assert 1.25 < high / low < 2.0, (low, high)  # 1.56 asked for


def _f0(audio, rate):
    """Median autocorrelation pitch (60-400 Hz) of the loud 40 ms frames."""
    frame = int(0.04 * rate)
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    loud = frames[np.sqrt((frames**2).mean(axis=1)) > 0.3 * np.sqrt((frames**2).mean(axis=1)).max()]
    low, high = rate // 400, rate // 60
    pitches = []
    for chunk in loud:
        chunk = chunk - chunk.mean()
        correlation = np.correlate(chunk, chunk, "full")[frame - 1 :]
        pitches.append(rate / (low + np.argmax(correlation[low:high])))
    return float(np.median(pitches))


@needs_engines
def test_every_word_is_said_by_every_speaker_of_every_engine_reproducibly():
    clips = voices.synthesize_clips(["yes", "house"], ["flite", "festival"], 2, seed=3, sample_rate=16000,
                                    clip_samples=16000, jobs=2)
    assert clips.audio.shape == (8, 16000) and clips.audio.dtype == np.int16
    assert sorted(clips.words) == ["house"] * 4 + ["yes"] * 4
    assert clips.failures == ()
    for clip in clips.audio:
        level = np.abs(clip.astype(np.float32) / 32768)
        assert 0.05 < level.max() < 0.9  # levelled as the speaker's peak level says
        assert level[:400].max() < 0.01 and level[-400:].max() < 0.01  # placed inside the clip, silence around
    again = voices.synthesize_clips(["yes", "house"], ["flite", "festival"], 2, seed=3, sample_rate=16000,
                                    clip_samples=16000, jobs=1)
    assert again.words == clips.words and np.array_equal(again.audio, clips.audio)
    other = voices.synthesize_clips(["yes", "house"], ["flite"], 2, seed=4, sample_rate=16000, clip_samples=16000,
                                    jobs=1)
    assert not np.array_equal(other.audio, clips.audio[: len(other.audio)])


def test_a_clip_an_engine_fails_on_is_reported_and_the_others_are_kept(monkeypatch):
    monkeypatch.setattr(voices, "missing_engines", lambda engines: [])

    def say(text, speaker):
        if text == "cat":
            raise RuntimeError("flite produced no audio")
        return np.sin(np.arange(8000) / 5).astype(np.float32) * 0.5, 8000

    clips = voices.synthesize_clips(["yes", "cat"], ["flite"], 3, seed=0, sample_rate=16000, clip_samples=16000,
                                    jobs=2, synthesize=say)
    assert clips.words == ("yes",) * 3 and clips.audio.shape == (3, 16000)
    assert [(word, reason) for word, _, reason in clips.failures] == [("cat", "RuntimeError: flite produced no audio")] * 3


def test_an_engine_that_says_nothing_is_a_clear_error(monkeypatch):
    """The program is there but not its voices: every clip fails, which is an error, not 0 clips."""
    monkeypatch.setattr(voices, "missing_engines", lambda engines: [])

    def say(text, speaker):
        raise RuntimeError("no voice kal_diphone")

    with pytest.raises(voices.VoicesError, match=r"festival could not say any of the 2 words .*no voice kal_diphone"):
        voices.synthesize_clips(["yes", "no"], ["festival"], 2, seed=0, sample_rate=16000, clip_samples=16000,
                                jobs=1, synthesize=say)


def test_only_folder_names_that_read_as_words_are_said():
    said, unsaid = voices.sayable_words(["yes", "don't", "follow-up", "Ärger", "kw_01", "7up", "a b", ""])
    assert said == ["yes", "don't", "follow-up", "Ärger"]
    assert unsaid == ["kw_01", "7up", "a b", ""]


def test_a_missing_engine_names_its_program_and_the_installer(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda program: None)
    with pytest.raises(voices.VoicesError, match=r"festival runs text2wave .*scripts/install_voices.sh"):
        voices.check_engines(["festival"])
    with pytest.raises(voices.VoicesError, match="unknown synthesis engine"):
        voices.check_engines(["espeak"])


def test_the_installer_installs_what_each_engine_runs():
    script = (REPO / "scripts" / "install_voices.sh").read_text()
    for program, packages in voices.ENGINE_PROGRAMS.values():
        assert f"apt_install.sh\" {program} {' '.join(packages)}" in script


def test_synthetic_voices_take_only_known_engines():
    assert load_config({"synthetic_voices": "flite,festival"}).synthetic_voices == ("flite", "festival")
    assert load_config({}).synthetic_voices == ()
    with pytest.raises(ConfigError, match="synthetic_voices.*must be one of"):
        load_config({"synthetic_voices": "espeak"})


def _config(data_dir, models_dir, **overrides):
    values = {"data_dir": str(data_dir), "models_dir": str(models_dir), "wanted_words": "yes,no",
              "validation_percentage": 25, "testing_percentage": 25, "how_many_training_steps": "2,1",
              "learning_rate": "0.001,0.0001", "batch_size": 8, "eval_step_interval": 2, "save_step_interval": 2,
              "streaming_minutes": 0, "model_architecture": "single_fc", **overrides}
    return load_config(values)


@needs_engines
def test_synthetic_clips_join_the_training_split_only(toy_data, tmp_path):
    plain = _config(toy_data, tmp_path)
    voiced = plain.replace(synthetic_voices=("flite", "festival"), synthetic_speakers=2)
    settings = settings_from_config(plain)
    before = prepare_data(plain, settings, toy_data, tmp_path / "no-lists")
    after = prepare_data(voiced, settings, toy_data, tmp_path / "no-lists")
    # Every word by 2 speakers of 2 engines: 4 more clips of each wanted word, 4 more of "bed".
    assert len(after.training.wanted_audio) == len(before.training.wanted_audio) + 8
    assert len(after.training.unknown_audio) == len(before.training.unknown_audio) + 4
    added = after.training.wanted_labels[len(before.training.wanted_labels):]
    assert sorted(added.tolist()) == sorted([after.index.label_index("yes")] * 4 + [after.index.label_index("no")] * 4)
    for split in data.SPLITS:  # validation and test stay the user's clips
        assert np.array_equal(after.evaluation[split][0], before.evaluation[split][0])
        assert np.array_equal(after.evaluation[split][1], before.evaluation[split][1])
    assert after.synthetic_summary()["clips"] == 12 and after.synthetic_summary()["words"] == 3


@needs_engines
def test_a_training_with_synthetic_voices_counts_them_in_metrics(toy_data, tmp_path):
    result = train(_config(toy_data, tmp_path, synthetic_voices="flite", synthetic_speakers=3), progress=False)
    metrics = json.loads(result.run.metrics_path.read_text())
    assert metrics["synthetic_clips"] == {"clips": 9, "words": 3, "unknown_texts": 0, "failed": 0,
                                          "failed_examples": []}
    assert json.loads(result.run.conf_path.read_text())["audio_processor"]["synthetic_voices"] == ["flite"]
    assert "Added 9 training clips of 3 words said by flite (synthetic_voices), 0 failed" in (
        result.run.logs / "train.log").read_text()


@needs_engines
def test_unknown_words_join_the_training_split_as_unknown_only(toy_data, tmp_path):
    plain = _config(toy_data, tmp_path, synthetic_voices="flite", synthetic_speakers=2)
    refusing = plain.replace(unknown_words=("lexicon", "light switch"), unknown_word_clips=12)
    settings = settings_from_config(plain)
    before = prepare_data(plain, settings, toy_data, tmp_path / "no-lists")
    after = prepare_data(refusing, settings, toy_data, tmp_path / "no-lists")
    assert len(after.training.wanted_audio) == len(before.training.wanted_audio)
    assert len(after.training.unknown_audio) == len(before.training.unknown_audio) + 12
    for split in data.SPLITS:
        assert np.array_equal(after.evaluation[split][1], before.evaluation[split][1])
    summary = after.synthetic_summary()
    assert summary["unknown_texts"] == 12 and summary["clips"] == 6 + 12
    said = after.synthetic.extra["synthetic"]["unknown"]
    assert "light switch" in said and not set(said) & {"yes", "no", "bed", "know"}


def test_unknown_words_and_text_only_need_engines_to_say_them():
    with pytest.raises(ConfigError, match="'unknown_words' needs synthetic_voices"):
        load_config({"unknown_words": "lexicon"})
    with pytest.raises(ConfigError, match="'text_only' needs synthetic_voices"):
        load_config({"text_only": "true"})
    assert load_config({"unknown_words": "lexicon,light switch", "synthetic_voices": "espeak-ng"}).unknown_words == (
        "lexicon", "light switch")


def test_the_api_caps_the_unknown_and_text_only_clips_too(toy_data, tmp_path):
    limits = Limits.from_env({"SPEECHCLAS_TRAIN_ROOTS": str(toy_data.parent), "SPEECHCLAS_MAX_SYNTHETIC_CLIPS": "100"})
    config = _config(toy_data, tmp_path, synthetic_voices="flite", synthetic_speakers=10, unknown_words="lexicon",
                     unknown_word_clips=71, data_splits_dir=str(toy_data.parent / "no-lists"))
    with pytest.raises(confine.ConfinementError, match=r"unknown_word_clips=71 would say 101 clips"):
        confine.check_api_training(config, limits, REPO)
    confine.check_api_training(config.replace(unknown_word_clips=70), limits, REPO)
    text_only = config.replace(text_only=True, wanted_words=("lights", "music"), synthetic_speakers=15)
    with pytest.raises(confine.ConfinementError, match=r"would say 101 clips \(the wanted words\)"):
        confine.check_api_training(text_only.replace(unknown_word_clips=71), limits, REPO)
    confine.check_api_training(text_only.replace(unknown_word_clips=70), limits, REPO)


def test_a_training_whose_engine_is_missing_fails_before_any_run_folder(toy_data, tmp_path, monkeypatch):
    monkeypatch.setattr(voices, "missing_engines", lambda engines: list(engines))
    with pytest.raises(data.DataError, match="install_voices.sh"):
        train(_config(toy_data, tmp_path / "models", synthetic_voices="festival"), progress=False)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_the_api_caps_the_clips_synthetic_voices_would_say(toy_data, tmp_path):
    limits = Limits.from_env({"SPEECHCLAS_TRAIN_ROOTS": str(toy_data.parent), "SPEECHCLAS_MAX_SYNTHETIC_CLIPS": "100"})
    config = _config(toy_data, tmp_path, synthetic_voices="flite,festival", synthetic_speakers=17,
                     data_splits_dir=str(toy_data.parent / "no-lists"))
    with pytest.raises(confine.ConfinementError, match=r"would say 102 clips \(3 words.*SPEECHCLAS_MAX_SYNTHETIC_CLIPS"):
        confine.check_api_training(config, limits, REPO)
    confine.check_api_training(config.replace(synthetic_speakers=16), limits, REPO)  # 96 clips
    clips = confine.count_clips(toy_data, ("yes", "no"), None)
    settings = settings_from_config(config)
    more = confine.estimate_memory(config, settings, clips).audio - confine.estimate_memory(
        config.replace(synthetic_voices=()), settings, clips).audio
    assert more == 5 * 102 * settings.desired_samples * 2  # int16, as confine.estimate_memory counts them in memory
