"""Shared fixtures: the demo data, one tiny trained run per test session, a project folder to serve it from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo"


def tiny_training_overrides(data_dir: Path, models_dir: Path) -> dict[str, str | int]:
    """A training of a few seconds on the demo data: enough to exercise every stage, not to be accurate."""
    return {
        "data_dir": str(data_dir),
        "models_dir": str(models_dir),
        "model_architecture": "tiny_conv",
        "how_many_training_steps": "40,10",
        "learning_rate": "0.001,0.0001",
        "eval_step_interval": 20,
        "batch_size": 50,
        "validation_percentage": 20,
        "testing_percentage": 20,
    }


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """Two wanted words and one unknown word, 8 speakers each, plus noise."""
    out = tmp_path_factory.mktemp("toy") / "audios"
    for word in ("yes", "no", "bed"):
        (out / word).mkdir(parents=True)
        for clip in sorted((DEMO_DATA / word).iterdir())[:8]:
            shutil.copy(clip, out / word / clip.name)
    shutil.copytree(DEMO_DATA / "_background_noise_", out / "_background_noise_")
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny_conv run on the demo data, shared by the whole session (about 10 s)."""
    from speechclas.config import load_config
    from speechclas.train import train

    models_dir = tmp_path_factory.mktemp("trained") / "models"
    config = load_config(tiny_training_overrides(DEMO_DATA, models_dir))
    return train(config, progress=False).run


# The split of `detection_run`: its test split holds the keywords that detection tests say.
DETECTION_VALIDATION_PERCENTAGE = DETECTION_TESTING_PERCENTAGE = 20


@pytest.fixture(scope="session")
def detection_run(tmp_path_factory):
    """One ds_cnn run on the demo data that hears keywords in a stream reliably (about 2 min on
    2 cores), shared by the detection tests of the API, the CLI and the web page."""
    from speechclas.config import load_config
    from speechclas.train import train

    overrides = {
        "data_dir": str(DEMO_DATA),
        "models_dir": str(tmp_path_factory.mktemp("detection") / "models"),
        "model_architecture": "ds_cnn",
        "how_many_training_steps": "450,150",
        "learning_rate": "0.004,0.0005",
        "time_shift_ms": 300,
        "batch_size": 64,
        "eval_step_interval": 1000,
        "validation_percentage": DETECTION_VALIDATION_PERCENTAGE,
        "testing_percentage": DETECTION_TESTING_PERCENTAGE,
        "streaming_minutes": 1.0,
        "streaming_noise_minutes": 2.0,
    }
    return train(load_config(overrides), progress=False).run


def make_project_home(root: Path, runs=()) -> Path:
    """A SPEECHCLAS_HOME: etc/config.yaml of the repository and a models/ folder holding copies of `runs`."""
    (root / "etc").mkdir(parents=True)
    shutil.copy(REPO / "etc" / "config.yaml", root / "etc" / "config.yaml")
    models_dir = root / "models"
    models_dir.mkdir()
    for run in runs:
        shutil.copytree(run.root, models_dir / run.name)
    return root


def demo_clip(word: str = "yes") -> Path:
    """The first demo recording of `word` (16 kHz, 16-bit mono, 1 s)."""
    return min((DEMO_DATA / word).glob("*.wav"))


def wav_bytes(samples, sample_rate: int, subtype: str = "PCM_16", file_format: str = "WAV") -> bytes:
    """Encode float samples ([n] or [n, channels]) as an audio file in memory."""
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, subtype=subtype, format=file_format)
    return buffer.getvalue()
