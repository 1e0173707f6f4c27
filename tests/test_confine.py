"""Trainings requested through the API are confined: paths, URL, labels, sizes and memory.

The stage itself (`speechclas.confine`) on real folders and links; through
the real DEEPaaS app (a 422 for each case of issue 8 before any work starts,
a legitimate request still trains) in tests/test_api.py, which owns the
session's one in-process app.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from speechclas import confine
from speechclas.config import ConfigError, load_config
from speechclas.features import settings_from_config
from speechclas.limits import Limits
from tests.conftest import DEMO_DATA, REPO, make_project_home, tiny_training_overrides
from tests.http_server import serve_directory

MODEL = "/v2/models/speechclas/"
TRAIN = MODEL + "train/"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A project folder: data/demo (a copy), data/outside (a link out of the roots), models/."""
    root = make_project_home(tmp_path_factory.mktemp("confine-home"))
    shutil.copytree(DEMO_DATA, root / "data" / "demo")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "yes").mkdir()
    (root / "data" / "outside").symlink_to(outside, target_is_directory=True)
    return root


def check(home: Path, limits: Limits | None = None, **overrides) -> None:
    config = load_config({"data_dir": "data/demo", **overrides})
    confine.check_api_training(config, limits or Limits.defaults(), home)


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameter, value",
    [
        ("data_dir", "/etc"),
        ("data_dir", "data/../../etc"),
        ("data_dir", "data/outside"),  # a link inside data/ that points out
        ("data_dir", "data/outside/yes"),
        ("data_dir", "."),
        ("data_splits_dir", "/etc"),
        ("start_checkpoint", "/etc/passwd"),
        ("start_checkpoint", "models/../../ckpt"),
    ],
)
def test_paths_outside_the_roots_are_refused(home, parameter, value):
    with pytest.raises(confine.ConfinementError) as caught:
        check(home, **{parameter: value})
    assert f"{parameter}={value!r} is outside" in str(caught.value)
    assert "SPEECHCLAS_TRAIN_ROOTS" in str(caught.value)


def test_a_refusal_does_not_tell_whether_the_outside_path_exists(home):
    messages = []
    for value in ("/etc", "/no-such-folder-anywhere"):
        with pytest.raises(confine.ConfinementError) as caught:
            check(home, data_dir=value)
        messages.append(str(caught.value).replace(repr(value), "X"))
    assert messages[0] == messages[1]


def test_paths_inside_the_roots_pass_even_before_they_exist(home):
    check(home, data_dir=str(home / "data" / "demo"), data_splits_dir="data/none", start_checkpoint="models/r/ckpts")


def test_a_link_loop_is_refused_not_crashed_on(home, tmp_path):
    loop = home / "data" / "loop"
    loop.symlink_to(loop)
    try:
        with pytest.raises(confine.ConfinementError, match="data_dir='data/loop' is outside"):
            check(home, data_dir="data/loop")
    finally:
        loop.unlink()


def test_the_operator_chooses_the_roots(home, tmp_path):
    limits = Limits.from_env({"SPEECHCLAS_TRAIN_ROOTS": f"models:{tmp_path}"})
    check(home, limits, data_dir=str(tmp_path), data_splits_dir=str(tmp_path / "splits"))
    with pytest.raises(confine.ConfinementError, match="data_dir='data/demo'"):
        check(home, limits)


def test_models_dir_is_the_operators(home, tmp_path):
    config = load_config({"data_dir": "data/demo", "models_dir": "/tmp/anything"})
    confined = confine.api_training_config(config, Limits.from_env({"SPEECHCLAS_MODELS_DIR": str(tmp_path)}), home)
    assert confined.models_dir == str(tmp_path.resolve())
    assert "models_dir" in confine.OPERATOR_PARAMETERS
    # The worker checks the whole training again before it starts (a request without arguments skips validation).
    with pytest.raises(confine.ConfinementError, match="data_dir='/etc'"):
        confine.api_training_config(config.replace(data_dir="/etc"), Limits.defaults(), home)


# --- data_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1/x.tgz", "loopback"),
        ("http://localhost/", "loopback"),
        ("http://[::1]/x.tgz", "loopback"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://10.0.0.1/x.tgz", "private"),
        ("file:///etc/passwd", "only http:// and https://"),
        ("gopher://example.com/", "only http:// and https://"),
    ],
)
def test_a_data_url_follows_the_predict_url_policy(home, url, reason):
    with pytest.raises(confine.ConfinementError) as caught:
        check(home, data_url=url)
    assert str(caught.value).startswith("parameter 'data_url'") and reason in str(caught.value)


def test_the_operator_may_allow_internal_data_urls(home):
    check(home, Limits.from_env({"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1"}), data_url="http://127.0.0.1/x.tgz")


# --- labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words, message",
    [
        (["yes", "n\no"], r"'n\\no' contains '\\n'"),
        (["yes", "a/b"], "contains '/'"),
        (["yes", "a\\b"], "contains"),
        (["yes", ".."], "starts with '.'"),
        (["yes", "."], "starts with '.'"),
        (["yes", "_unknown_"], "starts with '_'"),
        (["yes", "tab\there"], "contains"),
        (["yes", "nul\x00"], "contains"),
        (["yes", "no", "yes"], "twice"),
    ],
)
def test_unsafe_label_names_are_refused_for_the_cli_too(words, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config({"wanted_words": words})
    assert "'wanted_words'" in str(caught.value)


def test_label_names_of_any_script_pass():
    words = ("sí", "нет", "हिन्दी", "二", "on-off", "v1.2", "a_b")
    assert load_config({"wanted_words": ",".join(words)}).wanted_words == words


def test_labels_are_capped_in_count_and_length(home):
    limits = Limits.defaults().replace(max_labels=3, max_label_chars=5)
    with pytest.raises(confine.ConfinementError, match=r"lists 4 words; .* limit is 3 \(SPEECHCLAS_MAX_LABELS\)"):
        check(home, limits, wanted_words="a,b,c,d")
    with pytest.raises(confine.ConfinementError, match=r"6 characters; .* 5 \(SPEECHCLAS_MAX_LABEL_CHARS\)"):
        check(home, limits, wanted_words="yes,sixsix")
    check(home, limits, wanted_words="yes,no,up")


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"how_many_training_steps": "40000,20000", "learning_rate": "0.01,0.001"},
         "how_many_training_steps=40000,20000 (60000 in all) is above this server's limit of 50000 steps "
         "(SPEECHCLAS_MAX_TRAIN_STEPS)"),
        ({"batch_size": 2000}, "batch_size=2000 is above this server's limit of 1024 (SPEECHCLAS_MAX_BATCH_SIZE)"),
        ({"clip_duration_ms": 10000, "sample_rate": 48000, "window_size_ms": 1, "window_stride_ms": 1},
         "clip_duration_ms=10000 is above this server's limit of 3000 ms (SPEECHCLAS_MAX_CLIP_DURATION_MS)"),
        ({"clip_duration_ms": 3000, "sample_rate": 48000, "window_size_ms": 1, "window_stride_ms": 1},
         "3000 frames × 40 bins = 120000"),
    ],
)  # fmt: skip
def test_sizes_over_the_caps_are_refused_naming_parameter_cap_and_variable(home, overrides, message):
    with pytest.raises(confine.ConfinementError) as caught:
        check(home, **overrides)
    assert message in str(caught.value)


def test_feature_cells_follow_the_training_feature_sizes(home):
    config = load_config({"clip_duration_ms": 3000, "sample_rate": 48000, "window_size_ms": 1, "window_stride_ms": 1})
    settings = settings_from_config(config)
    limit = settings.spectrogram_length * settings.fingerprint_width
    assert confine.check_feature_cells(config, Limits.defaults().replace(max_feature_cells=limit)) == settings
    with pytest.raises(confine.ConfinementError, match="SPEECHCLAS_MAX_FEATURE_CELLS"):
        confine.check_feature_cells(config, Limits.defaults().replace(max_feature_cells=limit - 1))


# --- memory ----------------------------------------------------------------------------------


def test_clips_are_counted_as_the_training_indexes_them(home, tmp_path):
    counted = confine.count_clips(home / "data" / "demo", ("yes", "no"), None)
    from speechclas.data import index_dataset

    index = index_dataset(home / "data" / "demo", ("yes", "no"), 10, 10)
    listed = [example for split in index.splits.values() for example in split]
    assert counted.wanted == sum(example.word in ("yes", "no") for example in listed)
    assert counted.total == len(listed)
    assert counted.background_seconds > 0
    # Split lists, when all three exist, decide instead (a listed clip may be listed twice).
    for name in ("train.txt", "val.txt", "test.txt"):
        (tmp_path / name).write_text("yes/a.wav\nyes/a.wav\n# comment\n\ndog/b.wav\n")
    assert (confine.count_clips(home / "data" / "demo", ("yes",), tmp_path).wanted,
            confine.count_clips(home / "data" / "demo", ("yes",), tmp_path).other) == (6, 3)  # fmt: skip
    assert confine.count_clips(tmp_path / "nowhere", ("yes",), None).total == 0


def test_the_memory_estimate_grows_with_clips_clip_length_and_batch():
    config = load_config({})
    settings = settings_from_config(config)
    small = confine.estimate_memory(config, settings, confine.ClipCount(1000, 1000, 60))
    assert confine.estimate_memory(config, settings, confine.ClipCount(10_000, 10_000, 60)).audio > 9 * small.audio
    longer = config.replace(clip_duration_ms=2000)
    assert confine.estimate_memory(longer, settings_from_config(longer), confine.ClipCount(1000, 1000, 60)).total > small.total
    assert confine.estimate_memory(config.replace(batch_size=1000), settings, confine.ClipCount(1000, 1000, 60)).batches > 9 * small.batches
    # Speech Commands (105,829 clips, 38,546 of the ten words) fits the default budget with the defaults.
    full = confine.estimate_memory(config, settings, confine.ClipCount(38_546, 105_829 - 38_546, 400))
    assert full.total < Limits.defaults().train_memory_mb * confine.MB


def test_a_streamed_training_is_estimated_by_its_buffers_not_its_dataset():
    config = load_config({})  # data_loading=auto: streamed above SPEECHCLAS_IN_MEMORY_MAX_MB (1 GB, 32k clips)
    settings = settings_from_config(config)
    speech_commands = confine.estimate_memory(config, settings, confine.ClipCount(38_546, 105_829 - 38_546, 400))
    millions = confine.estimate_memory(config, settings, confine.ClipCount(1_000_000, 4_000_000, 400))
    more = confine.estimate_memory(config, settings, confine.ClipCount(3_000_000, 12_000_000, 400))
    assert millions.audio == speech_commands.audio and more.total == millions.total  # flat: set by its bounds
    assert speech_commands.total < millions.total < 6144 * confine.MB  # far under the 12 GB default budget
    held = confine.estimate_memory(config.replace(data_loading="memory"), settings,
                                   confine.ClipCount(38_546, 105_829 - 38_546, 400))
    assert held.audio > 3 * speech_commands.audio  # what holding them would take
    bigger_buffer = confine.estimate_memory(config.replace(shuffle_buffer=40_000), settings,
                                            confine.ClipCount(38_546, 105_829 - 38_546, 400))
    assert bigger_buffer.audio - speech_commands.audio == 2 * 30_000 * settings.desired_samples * 2


def test_a_training_over_the_memory_budget_is_refused(home):
    limits = Limits.defaults().replace(train_memory_mb=1000)
    with pytest.raises(confine.ConfinementError) as caught:
        check(home, limits)
    message = str(caught.value)
    assert "above this server's budget of 1000 MB (SPEECHCLAS_TRAIN_MEMORY_MB)" in message
    assert "1120 clips" in message and "batch_size" in message


def test_the_training_checks_the_memory_of_the_data_it_found_before_loading_it(tmp_path, monkeypatch):
    """A data_url's clips are known only once downloaded: the training checks them then, before
    any clip is loaded or any run folder made (the CLI, with no limits, is not checked)."""
    from speechclas.train import train

    archive = tmp_path / "served" / "demo.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(DEMO_DATA, arcname="demo")
    monkeypatch.setenv("SPEECHCLAS_ALLOW_PRIVATE_URLS", "1")
    limits = Limits.defaults().replace(train_memory_mb=1000, allow_private_urls=True)
    with serve_directory(archive.parent) as base:
        config = load_config({**tiny_training_overrides(DEMO_DATA, tmp_path / "models"), "data_url": f"{base}/demo.tgz"})
        with pytest.raises(confine.ConfinementError, match="1120 clips.*SPEECHCLAS_TRAIN_MEMORY_MB"):
            train(config, base_dir=tmp_path, progress=False, limits=limits, confined=True)
    assert (tmp_path / "data" / "downloads").is_dir()
    assert not (tmp_path / "models").exists()


def test_the_api_process_never_imports_tensorflow():
    """Validation runs in DEEPaaS's main process, which must stay small and quick."""
    code = "import sys, speechclas.api, speechclas.confine; assert 'tensorflow' not in sys.modules, 'tensorflow'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_an_api_training_on_a_cluster_needs_the_servers_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(confine.ConfinementError, match=r"distribution=multi_worker needs TF_CONFIG"):
        confine.check_argument("distribution", "multi_worker", Limits.defaults(), Path("."))
    confine.check_argument("distribution", "mirrored", Limits.defaults(), Path("."))
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}')
    confine.check_argument("distribution", "multi_worker", Limits.defaults(), Path("."))
