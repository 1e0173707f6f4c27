"""Detection on streams of voices a run never heard, at the threshold its training calibrated.

A run's own streaming evaluation speaks with its held-out speakers, who are of
the training's engines. This benchmark speaks with a whole engine the run did
not train on (one of benchmarks/time_to_accuracy.py's families, e.g. festival
for a run trained without it): a word stream of the family's keywords and other
words (one every 2-4 s over background noise), and noise with babble made of
the family's other words and lexicon words and phrases said by that engine's
speakers. It reports the share of keywords found with their label and the false
accepts per hour on the noise with babble, at the run's calibrated threshold.

    python benchmarks/heldout_streams.py --run festival=models/<run without festival> \
        --family-dir festival=/work/tta-data/data/festival-... --minutes 10
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import numpy as np
from time_to_accuracy import emit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
NOISE_DIR = REPO / "data" / "demo" / "_background_noise_"
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # thresholds of the curve reported beside the calibrated one
logger = logging.getLogger("heldout_streams")


def family_clips(folder: Path, labels: list[str], sample_rate: int) -> tuple[np.ndarray, list[str]]:
    """Every clip of a family folder (int16, one clip long) and its label (other words: _unknown_)."""
    from speechclas.audio import decode_audio

    clips, names = [], []
    for path in sorted(folder.glob("*/*.wav")):
        audio = decode_audio(path, sample_rate).samples[:sample_rate]
        clip = np.zeros(sample_rate, np.float32)
        clip[: len(audio)] = audio
        clips.append(np.round(np.clip(clip, -1, 1) * 32767).astype(np.int16))
        names.append(path.parent.name if path.parent.name in labels else "_unknown_")
    return np.stack(clips), names


def engine_babble(engine: str, wanted: list[str], count: int, sample_rate: int, seed: int) -> np.ndarray:
    """Lexicon words and phrases said by 8 speakers of `engine` drawn from `seed`."""
    from speechclas import lexicon, voices

    texts = lexicon.unknown_texts(wanted, [lexicon.LEXICON_ITEM], count, seed)
    return voices.synthesize_clips([], [engine], 8, seed, sample_rate, sample_rate, jobs=os.cpu_count() or 1,
                                   unknown=texts).audio


def measure(run_dir: Path, family: str, folder: Path, minutes: float, babble_clips: int, seed: int) -> dict:
    from speechclas import data, detect, streaming, voices
    from speechclas.rundir import RunDir

    run = RunDir(run_dir.resolve())
    scorer = detect.load_scorer(run)
    rate = scorer.sample_rate
    labels = list(scorer.labels)
    clips, names = family_clips(folder, labels, rate)
    background, _ = data.load_background(NOISE_DIR.parent, [f"{NOISE_DIR.name}/{p.name}" for p in
                                                             sorted(NOISE_DIR.glob("*.wav"))], rate, rate)
    seconds = 60.0 * minutes
    words = streaming.word_stream(clips, names, background, rate, seconds, 0.1, seed)
    others = clips[[i for i, name in enumerate(names) if name == "_unknown_"]]
    if family in voices.ENGINE_PROGRAMS and babble_clips > 0:
        others = np.concatenate([others, engine_babble(family, [w for w in labels if not w.startswith("_")],
                                                       babble_clips, rate, seed)])
    babble = streaming.babble_stream(others, background, rate, seconds, seed + 1)
    noise = streaming.noise_stream(background, rate, seconds, seed + 2)
    threshold = detect.default_threshold(run)
    settings = detect.DetectSettings.for_features(scorer.feature_settings, threshold=threshold)
    scored = streaming.score_streams(scorer, words, noise, settings, babble)
    figures = scored.metrics(labels, settings, 0.75)
    curve = []
    for swept in SWEEP:
        at = scored.metrics(labels, dataclasses.replace(settings, threshold=swept), 0.75)
        curve.append({"threshold": swept, "correct_percentage": at["correct_percentage"],
                      "false_accepts_per_hour": at["false_accepts_per_hour"],
                      "babble_false_accepts_per_hour": at["babble_false_accepts_per_hour"]})
    return {"run": str(run_dir), "family": family, "threshold": threshold, "minutes": minutes,
            "babble_speech_clips": len(others), **figures, "curve": curve}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="FAMILY=RUN_DIR",
                        help="a run and the family it never heard; repeat for several")
    parser.add_argument("--family-dir", action="append", required=True, metavar="FAMILY=FOLDER")
    parser.add_argument("--minutes", type=float, default=10.0, help="of each stream: words, noise, babble")
    parser.add_argument("--babble-clips", type=int, default=200, help="lexicon clips the family's engine says")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--jsonl", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    folders = dict(item.split("=", 1) for item in args.family_dir)
    rows = []
    for item in args.run:
        family, run_dir = item.split("=", 1)
        row = measure(Path(run_dir), family, Path(folders[family]), args.minutes, args.babble_clips, args.seed)
        rows.append(row)
        emit(row, args.jsonl)
    print("| family | threshold | keywords | found with their label (%) | false accepts/h, noise and babble "
          "| of babble | of noise |\n|---|---|---|---|---|---|---|")
    for row in rows:
        hours = (row["noise_minutes"] + row.get("babble_minutes", 0)) / 60
        both = (row["noise_detections"] + row.get("babble_detections", 0)) / hours if hours else None
        print(f"| {row['family']} | {row['threshold']:g} | {row['keywords']} | {row['correct_percentage']} | "
              f"{both:.1f} | {row.get('babble_false_accepts_per_hour')} | {row['noise_false_accepts_per_hour']} |")
    for row in rows:
        print(f"\n{row['family']}: | threshold | keywords found (%) | false accepts/h (all) | of babble |\n|---|---|---|---|")
        for point in row["curve"]:
            print(f"| {point['threshold']:g} | {point['correct_percentage']} | {point['false_accepts_per_hour']} | "
                  f"{point['babble_false_accepts_per_hour']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
