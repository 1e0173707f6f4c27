"""The pure parts of benchmarks/time_to_accuracy.py: budget to steps, scoring,
recipes, and (with espeak-ng and sox) the held-out family builder."""

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import pytest
import soundfile as sf

from speechclas.config import load_param_specs

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    # As `python benchmarks/time_to_accuracy.py` runs it: its folder first on the path, for quickstart_recipe.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("time_to_accuracy", ROOT / "benchmarks" / "time_to_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tta = _load_benchmark()


def assert_two_words_of_two_speakers(family: str, folder: Path) -> list[Path]:
    """A family built for yes,no by 2 speakers: 4 clips of 16 kHz mono PCM16, at most 1 s; answers them."""
    clips = sorted(folder.glob("*/*.wav"))
    assert {c.parent.name for c in clips} == {"yes", "no"}, family
    assert len(clips) == 4 and len(tta.speaker_ids(folder)) == 2, family
    for clip in clips:
        info = sf.info(clip)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), clip
        assert 1600 <= info.frames <= 16000, clip
    return clips


def test_steps_fill_the_budget_and_one_more_would_not_fit():
    calibration = tta.Calibration(fixed_s=60.0, step_s=0.3, eval_s=5.0)
    for budget_s, interval in ((300.0, 400), (600.0, 100), (61.0, 400)):
        steps = tta.steps_for_budget(budget_s, calibration, interval)
        assert steps >= 1
        assert tta.training_seconds(steps, calibration, interval) <= budget_s
        assert tta.training_seconds(steps + 1, calibration, interval) > budget_s
    # 240 s after the fixed cost: 783 steps after the first (234.9 s) and one evaluation (5 s)
    assert tta.steps_for_budget(300.0, calibration, 400) == 784


def test_a_budget_below_the_fixed_cost_holds_no_steps():
    assert tta.steps_for_budget(30.0, tta.Calibration(fixed_s=60.0, step_s=0.3, eval_s=5.0), 400) == 0


def test_calibration_splits_steps_evaluation_and_fixed_cost():
    step_s, eval_s, eval_after = 0.5, 4.0, 5
    times, now = [], 10.0  # 10 s before the first step ended: loading and tracing
    for step in range(1, 11):
        now += step_s + (eval_s if step == eval_after + 1 else 0.0)
        times.append(now)
    total_s = times[-1] + 20.0  # final evaluation and exports after the last step
    calibration = tta.calibration_from_times(times, total_s, eval_after)
    assert calibration.step_s == pytest.approx(step_s)
    assert calibration.eval_s == pytest.approx(eval_s)
    assert calibration.fixed_s == pytest.approx(total_s - 9 * step_s - eval_s)
    assert tta.training_seconds(10, calibration, eval_after) == pytest.approx(total_s)


def test_stages_scale_in_proportion_and_add_up():
    assert tta.scale_stages((1000, 300), 130) == (100, 30)
    assert sum(tta.scale_stages((1000, 300), 7)) == 7
    assert tta.scale_stages((1000, 1, 1), 3) == (1, 1, 1)
    assert tta.scale_stages((500,), 42) == (42,)
    with pytest.raises(ValueError):
        tta.scale_stages((1, 1, 1), 2)


def test_balanced_accuracy_is_the_mean_recall_over_classes_present():
    truth = ["yes"] * 4 + ["no"] * 2 + ["_unknown_"] * 10
    predicted = ["yes", "yes", "yes", "no"] + ["_silence_", "no"] + ["_unknown_"] * 10
    # recalls: yes 3/4, no 1/2, unknown 1 ("up" has no clip and is not counted)
    score = tta.balanced_accuracy(truth, predicted, ["yes", "no", "up", "_unknown_"])
    assert score == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # answering _unknown_ to everything scores 1/3 here, whatever the plain accuracy
    assert tta.balanced_accuracy(truth, ["_unknown_"] * 16, ["yes", "no", "_unknown_"]) == pytest.approx(1 / 3)


def test_recipe_parser_keeps_known_keys_and_reports_the_others():
    specs = load_param_specs()
    overrides, skipped = tta.parse_recipe(
        "model_architecture=ds_cnn learning_rate=0.001,0.0001 no_such_option=3 junk", specs
    )
    assert overrides == {"model_architecture": "ds_cnn", "learning_rate": "0.001,0.0001"}
    assert len(skipped) == 2 and "no_such_option" in skipped[0] and "junk" in skipped[1]


def test_unknown_architectures_are_skipped_with_a_message(caplog):
    specs = load_param_specs()
    recipes = {"r": "model_architecture=ds_cnn how_many_training_steps=10 learning_rate=0.01 future_knob=1"}
    with caplog.at_level(logging.WARNING, logger="time_to_accuracy"):
        combos = list(tta.combinations(recipes, ["conv", "no_such_net"], specs))
    assert [combo["model_architecture"] for _, combo in combos] == ["conv"]
    assert all("future_knob" not in combo for _, combo in combos)
    assert "no_such_net" in caplog.text and "future_knob" in caplog.text
    assert [c["model_architecture"] for _, c in tta.combinations(recipes, [], specs)] == ["ds_cnn"]


def test_family_clips_label_other_words_unknown(tmp_path):
    for word in ("yes", "cat", "_background_noise_"):
        (tmp_path / word).mkdir()
        (tmp_path / word / "a_nohash_0.wav").write_bytes(b"")
    labels = [label for _, label in tta.family_clips(tmp_path, ["yes", "no"])]
    assert sorted(labels) == ["_unknown_", "yes"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng and sox")
def test_heldout_families_hold_every_word_of_new_voices_and_are_reused(tmp_path, caplog):
    sizes = tta.DataSizes(training_speakers=2, heldout_speakers=2, words="yes,no")
    espeak = ("other-languages", "klatt", "channel")
    families = tta.build_heldout_families(tmp_path, sizes, jobs=1, families=espeak)
    assert set(families) == set(espeak)
    for family, folder in families.items():
        assert_two_words_of_two_speakers(family, folder)
    voices = (families["other-languages"] / "README.md").read_text()
    assert "| en" not in voices and any(f"| {v} |" in voices for v in tta.OTHER_LANGUAGE_VOICES)
    assert not any(f"| {v} |" in voices for v in tta.KLATT_VARIANTS)
    klatt = (families["klatt"] / "README.md").read_text()
    assert any(f"| {v} |" in klatt for v in tta.KLATT_VARIANTS)
    clean = next((tmp_path / "data").glob("channel-clean-*"))
    for clip in families["channel"].glob("*/*.wav"):
        original = clean / clip.relative_to(families["channel"])
        assert clip.read_bytes() != original.read_bytes(), clip
    with caplog.at_level(logging.INFO, logger="time_to_accuracy"):
        assert tta.build_heldout_families(tmp_path, sizes, jobs=1, families=espeak) == families
    assert "Reusing" in caplog.text and "Building" not in caplog.text


def test_overall_is_the_mean_over_all_families_and_other_engines_over_flite_and_festival():
    balanced = {"other-languages": 0.9, "klatt": 1.0, "channel": 0.8, "flite": 0.4, "festival": 0.2}
    assert tta.summary(balanced) == {"overall": pytest.approx(0.66), "other_engines": pytest.approx(0.3)}
    assert tta.summary({"klatt": 1.0, "channel": 0.5}) == {"overall": 0.75, "other_engines": None}
    row = {"recipe": "r", "architecture": "ds_cnn", "budget_min": 5, "steps": 10, "train_s": 1.0, "parameters": 1000,
           "latency_ms": 1.0, "validation_accuracy": 0.99, "balanced_accuracy": balanced, **tta.summary(balanced)}
    header, _, line = tta.markdown_table([row], list(balanced)).splitlines()
    assert header.split(" | ")[-4:] == ["held-out overall", "keyword recall", "unknown recall", "other engines |"]
    assert line.split(" | ")[-4:] == ["0.660", "", "", "**0.300** |"]
    keyword = {"klatt": 0.9, "channel": 0.5}
    unknown = {"klatt": 1.0, "channel": 0.6}
    assert tta.summary({"klatt": 1.0, "channel": 0.5}, keyword, unknown) == {
        "overall": 0.75, "other_engines": None, "keyword_recall": 0.7, "unknown_recall": 0.8}


ENGINES_MISSING = shutil.which("flite") is None or shutil.which("text2wave") is None


@pytest.mark.skipif(ENGINES_MISSING, reason="needs flite and festival")
def test_engine_families_hold_every_word_of_each_speaker_and_are_reused(tmp_path, caplog):
    sizes = tta.DataSizes(training_speakers=2, heldout_speakers=2, words="yes,no", engine_speakers=2)
    families = tta.build_heldout_families(tmp_path, sizes, jobs=1, families=tta.ENGINE_FAMILIES)
    assert set(families) == {"flite", "festival"}
    for family, folder in families.items():
        for clip in assert_two_words_of_two_speakers(family, folder):
            audio, _ = sf.read(clip)
            assert 0.02 < abs(audio).max() < 0.9 and abs(audio[:50]).max() < 0.01, clip  # levelled, silent lead
        voices = {s.voice for s in tta.voices.choose_engine_speakers(family, 2, tta.FAMILY_SEEDS[family])}
        readme = (folder / "README.md").read_text()
        assert len(voices) == 2 and all(f"| {v} |" in readme for v in voices), family
    with caplog.at_level(logging.INFO, logger="time_to_accuracy"):
        assert tta.build_heldout_families(tmp_path, sizes, jobs=1, families=tta.ENGINE_FAMILIES) == families
    assert "Reusing" in caplog.text and "Building" not in caplog.text


def test_score_run_scores_a_finished_run_on_every_family_with_its_own_words(trained_run, tmp_path):
    demo = ROOT / "data" / "demo"
    families = {}
    for family, words in (("klatt", ("yes", "cat")), ("flite", ("no", "house"))):
        for word in words:
            (tmp_path / family / word).mkdir(parents=True)
            for clip in sorted((demo / word).glob("*.wav"))[:3]:
                shutil.copy(clip, tmp_path / family / word / clip.name)
        families[family] = tmp_path / family
    scores = tta.score_run(trained_run.root, families)
    assert scores["clips"] == {"klatt": 6, "flite": 6}
    wanted = [label for label in trained_run.labels() if not label.startswith("_")]
    from speechclas.predict import Predictor

    predictor = Predictor.load(trained_run)
    for family, folder in families.items():
        expected = tta.score_family(predictor, tta.family_clips(folder, wanted), wanted)["balanced_accuracy"]
        assert scores["balanced_accuracy"][family] == pytest.approx(expected, abs=1e-4)
    assert scores["overall"] == pytest.approx(sum(scores["balanced_accuracy"].values()) / 2, abs=1e-4)
    assert scores["other_engines"] == scores["balanced_accuracy"]["flite"]


def test_an_engine_the_recipe_trains_on_is_scored_by_a_training_without_it(trained_run, tmp_path, monkeypatch):
    """Leave one engine out: festival is in synthetic_voices, so its family is scored by a
    second training whose synthetic_voices lack festival; the other families by the first."""
    from speechclas.config import load_config
    from speechclas.predict import Predictor

    demo = ROOT / "data" / "demo"
    families = {}
    for family in ("klatt", "festival", "flite"):
        for word in ("yes", "cat"):
            (tmp_path / family / word).mkdir(parents=True)
            for clip in sorted((demo / word).glob("*.wav"))[:2]:
                shutil.copy(clip, tmp_path / family / word / clip.name)
        families[family] = tmp_path / family
    trainings = []

    class Result:
        run = trained_run

    def fake_training(config, base_dir):
        trainings.append(config.synthetic_voices)
        return Result(), 1.0, None

    monkeypatch.setattr(tta, "timed_training", fake_training)
    config = load_config({"wanted_words": "yes,no", "synthetic_voices": "festival,flite"})
    scores = tta.score_heldout(Predictor.load(trained_run), config, families, tmp_path)
    assert trainings == [("festival",), ("flite",)]  # flite left out first, then festival
    assert set(scores["left_out_runs"]) == {"festival", "flite"}
    assert set(scores["balanced_accuracy"]) == set(families) and scores["clips"]["festival"] == 4
    assert scores["other_engines"] == pytest.approx(
        (scores["balanced_accuracy"]["festival"] + scores["balanced_accuracy"]["flite"]) / 2, abs=1e-4)
    row = {"recipe": "r", "architecture": "tiny_conv", "budget_min": None, "steps": 1, "train_s": 1.0,
           "parameters": 1, "latency_ms": 1.0, "validation_accuracy": 1.0, **scores}
    table = tta.markdown_table([row], list(families))
    assert "*" in table.splitlines()[2] and "without that engine" in table


def test_the_quickstart_recipe_is_the_scripts_own_string_and_a_known_recipe():
    from quickstart_recipe import quickstart_overrides, quickstart_text

    text = quickstart_text()
    assert tta.RECIPES["quickstart"] == text
    overrides, skipped = tta.parse_recipe(text, load_param_specs())
    assert skipped == [] and overrides == quickstart_overrides()


def test_the_given_budget_keeps_the_recipes_steps():
    args = tta.parse_args(["--budgets", "given,5"])
    assert args.budgets == [None, 5.0]
