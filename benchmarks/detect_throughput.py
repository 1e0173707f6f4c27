"""Real-time factor of keyword detection in long audio, against the naive way.

    python benchmarks/detect_throughput.py                    # trains ds_cnn and the quick start's model briefly
    python benchmarks/detect_throughput.py --minutes 5        # a shorter file while developing
    python benchmarks/detect_throughput.py --run ds_cnn=models/2025-01-01_120000
    python benchmarks/detect_throughput.py --recipe ds_cnn --recipe tiny_conv --recipe quickstart \
        --recipe "bcr=model_architecture=bc_resnet model_width=1.5"

For each model: the wall time of `speechclas.detect.detect_audio` (what
``speechclas-detect`` and ``mode=detect`` run: decoding in blocks, features
once per block, for a network with a ``time_pool`` layer its trunk once over the
stream and each window the mean of its columns, else windows batched through the
model; smoothing) on a generated
recording of `--minutes`, as the real-time factor RTF = wall time / audio
time, and the windows scored per second. Then the naive way, one
`Predictor.probabilities` call per hop window (features computed again for
every window), timed on `--naive-seconds` of the same file and extrapolated.
The model's loading is timed apart (it is paid once per process).

The generated file is demo keywords every 2-4 s over background noise, written
in blocks (an hour at 16 kHz is 115 MB of 16-bit wav). Speed does not depend
on how well a model was trained, so the trainings here are a few steps only.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from quickstart_recipe import quickstart_overrides

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo"
SAMPLE_RATE = 16000
BRIEF_STEPS = "30"  # enough to export a working model; speed does not depend on accuracy
# Overrides that change how well a model is trained, not what it computes per window.
TRAINING_ONLY = {"how_many_training_steps", "learning_rate", "eval_step_interval", "batch_size"}


def recipe_overrides(recipe: str) -> tuple[str, dict[str, str]]:
    """(name, overrides) of a ``--recipe``: ``quickstart`` (scripts/quickstart.sh's training), an
    architecture's name, or ``NAME=key=value key=value...`` (config.yaml's names)."""
    name, _, words = recipe.partition("=")
    if words:
        return name, dict(word.split("=", 1) for word in shlex.split(words))
    if name == "quickstart":
        return name, quickstart_overrides()
    return name, {"model_architecture": name}


def train_brief(overrides: dict[str, str], models_dir: Path) -> Path:
    """A run of `overrides` on the demo data, trained a few steps; its folder."""
    from speechclas.config import load_config
    from speechclas.train import train

    settings = {**overrides, "data_dir": str(DEMO_DATA), "models_dir": str(models_dir),
                "how_many_training_steps": BRIEF_STEPS, "learning_rate": "0.001", "eval_step_interval": 30,
                "batch_size": 50, "validation_percentage": 20, "testing_percentage": 20}  # fmt: skip
    return train(load_config(settings), progress=False).run.root


def write_long_recording(path: Path, seconds: float, seed: int = 0) -> None:
    """Demo keywords every 2-4 s over looped background noise, written block by block."""
    import soundfile

    rng = np.random.default_rng(seed)
    clips = [soundfile.read(p, dtype="float32")[0] for p in sorted(DEMO_DATA.glob("[!_]*/*.wav"))]
    noise = np.concatenate([soundfile.read(p, dtype="float32")[0]
                            for p in sorted((DEMO_DATA / "_background_noise_").glob("*.wav"))])  # fmt: skip
    total = int(seconds * SAMPLE_RATE)
    block = 60 * SAMPLE_RATE
    next_word = int(rng.uniform(1, 3) * SAMPLE_RATE)
    carried = np.zeros(0, np.float32)  # the end of a word that crosses into the next block
    with soundfile.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for start in range(0, total, block):
            length = min(block, total - start)
            audio = 0.1 * np.resize(np.roll(noise, -(start % len(noise))), length)
            audio[: len(carried)] += carried[:length]
            carried = np.zeros(0, np.float32)
            while next_word < start + length:
                clip = clips[rng.integers(len(clips))]
                at = next_word - start
                audio[at : at + len(clip)] += clip[: length - at]
                carried = clip[length - at :]
                next_word += int(rng.uniform(2, 4) * SAMPLE_RATE)
            out.write(np.clip(audio, -1, 1))


def time_detection(run_root: Path, recording: Path, hop_ms: float | None) -> dict:
    """Loading the run's scorer, then detect_audio over the recording."""
    from speechclas.audio import AudioLimits
    from speechclas.detect import DetectSettings, SharedTrunkScorer, detect_audio, load_scorer
    from speechclas.limits import Limits
    from speechclas.predict import feature_sizes
    from speechclas.rundir import RunDir

    run = RunDir(run_root)
    started = time.perf_counter()
    scorer = load_scorer(run)
    load_s = time.perf_counter() - started
    settings = DetectSettings.for_features(feature_sizes(run), hop_ms=hop_ms)
    limits = AudioLimits.from_limits(Limits.defaults()).with_max_seconds(10 * 24 * 3600.0, "the benchmark")
    started = time.perf_counter()
    result = detect_audio(scorer, recording, settings, limits, name=recording.name)
    wall_s = time.perf_counter() - started
    hop_s = settings.hop_ms / 1000
    windows = int((result["duration_s"] - scorer.window_samples / scorer.sample_rate) / hop_s) + 1
    return {"load_s": load_s, "wall_s": wall_s, "audio_s": result["duration_s"], "windows": windows,
            "detections": len(result["detections"]), "hop_ms": settings.hop_ms,
            "path": "shared trunk" if isinstance(scorer, SharedTrunkScorer) else "per window"}  # fmt: skip


def time_naive(run_root: Path, recording: Path, seconds: float, hop_ms: float) -> dict:
    """One `Predictor.probabilities` call per hop window over the first `seconds` of the recording."""
    import soundfile

    from speechclas.predict import Predictor
    from speechclas.rundir import RunDir

    predictor = Predictor.load(RunDir(run_root))
    window = predictor.settings.desired_samples
    hop = round(hop_ms * predictor.settings.sample_rate / 1000)
    audio = soundfile.read(recording, frames=int(seconds * SAMPLE_RATE), dtype="float32")[0]
    starts = range(0, len(audio) - window + 1, hop)
    started = time.perf_counter()
    for start in starts:
        predictor.probabilities(audio[start : start + window])
    wall_s = time.perf_counter() - started
    return {"wall_s": wall_s, "audio_s": len(audio) / SAMPLE_RATE, "windows": len(starts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the generated recording (default: 60)")
    parser.add_argument("--naive-seconds", type=float, default=60.0,
                        help="audio scored the naive way, then extrapolated (default: 60)")
    parser.add_argument("--hop-ms", type=float, default=None, help="default: the models' default hop (2 strides)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="time this finished run instead of training (repeatable)")
    parser.add_argument("--recipe", action="append", default=[], metavar="RECIPE",
                        help="train this briefly and time it (repeatable): quickstart, an architecture's name, or "
                             "'NAME=key=value key=value' (default: ds_cnn and quickstart)")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory(prefix="detect-throughput-") as folder:
        folder = Path(folder)
        runs: dict[str, Path] = {}
        for item in args.run:
            name, _, path = item.partition("=")
            runs[name] = Path(path)
        for recipe in args.recipe:
            name, overrides = recipe_overrides(recipe)
            runs[name] = train_brief(overrides, folder / "models" / name)
        if not runs:
            quickstart = quickstart_overrides()
            runs["ds_cnn"] = train_brief({"model_architecture": "ds_cnn"}, folder / "models")
            same = {k: v for k, v in quickstart.items() if k not in TRAINING_ONLY} == {"model_architecture": "ds_cnn"}
            if same:
                print(f"The quick start's model ({' '.join(f'{k}={v}' for k, v in quickstart.items())}) computes "
                      "what ds_cnn computes per window (it differs in training only): timed once, as ds_cnn.")
            else:
                runs["quickstart"] = train_brief(quickstart, folder / "models")
        recording = folder / "long.wav"
        started = time.perf_counter()
        write_long_recording(recording, 60 * args.minutes)
        print(f"Generated {args.minutes:g} min of keywords over noise in {time.perf_counter() - started:.0f} s "
              f"({recording.stat().st_size / 1e6:.0f} MB)")
        rows = []
        for name, root in runs.items():
            fast = time_detection(root, recording, args.hop_ms)
            naive = time_naive(root, recording, args.naive_seconds, fast["hop_ms"])
            rows.append((name, fast, naive))
            print(f"{name}: {fast}\n  naive: {naive}", flush=True)

    print(f"\nCPU cores: {os.cpu_count()}, load average (1 min) at the start: {load_at_start:.1f}, "
          f"at the end: {os.getloadavg()[0]:.1f}")
    print("| model | path | hop | audio | wall time | RTF | windows/s | naive RTF (extrapolated) | naive windows/s "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, fast, naive in rows:
        rtf = fast["wall_s"] / fast["audio_s"]
        naive_rate = naive["windows"] / naive["wall_s"]
        naive_rtf = fast["windows"] / naive_rate / fast["audio_s"]  # the same windows, at the naive rate
        print(f"| {name} | {fast['path']} | {fast['hop_ms']:g} ms | {fast['audio_s'] / 60:.1f} min | {fast['wall_s']:.1f} s | "
              f"{rtf:.4f} | {fast['windows'] / fast['wall_s']:.0f} | {naive_rtf:.3f} | {naive_rate:.0f} | "
              f"{naive_rtf / rtf:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
