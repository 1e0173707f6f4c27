"""Throughput of ``speechclas-detect --manifest``: one worker process against several.

    python benchmarks/manifest_throughput.py                        # trains ds_cnn briefly
    python benchmarks/manifest_throughput.py --run models/2025-01-01_120000 --jobs 1 --jobs 2
    python benchmarks/manifest_throughput.py --files 40 --seconds 60 --engine ray

Writes `--files` recordings of `--seconds` (demo keywords every 2-4 s over
background noise, as benchmarks/detect_throughput.py makes them) and a
manifest of them, then runs the job once per `--jobs` value through
`speechclas.manifest`'s engines (what the CLI runs; no results file).
For each: the wall time from start to the last line (worker start-up, which
imports TensorFlow and loads the run in every worker, included), the time
to the first line, files/s and audio seconds per wall second over the whole
job, and the same rate after the first line (the steady state a long job
sees). Speed does not depend on how well a model was trained, so the
training here is a few steps only.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from detect_throughput import train_brief, write_long_recording


def time_job(manifest: Path, models_dir: Path, run: str, jobs: int, engine: str) -> dict:
    """One job over the manifest, timed line by line (the lines are counted, not kept)."""
    from speechclas.detect import CLI_MAX_SECONDS
    from speechclas.limits import Limits
    from speechclas.manifest import ENGINES, DetectOptions, plan_job, read_manifest

    started = time.perf_counter()
    entries = read_manifest(manifest)
    job = plan_job(models_dir, DetectOptions(CLI_MAX_SECONDS, "the benchmark", run=run), Limits.defaults())
    arrivals, audio_s, errors = [], [], 0
    for record in ENGINES[engine](job, entries, jobs):
        arrivals.append(time.perf_counter() - started)
        errors += "error" in record
        audio_s.append(record.get("duration_s", 0.0))
    wall_s = arrivals[-1]
    steady_s = wall_s - arrivals[0]
    return {"jobs": jobs, "files": len(entries), "errors": errors, "wall_s": wall_s, "first_s": arrivals[0],
            "files_per_s": len(entries) / wall_s, "audio_per_s": sum(audio_s) / wall_s,
            "steady_audio_per_s": sum(audio_s[1:]) / steady_s if steady_s > 0 else float("nan")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20, help="recordings in the manifest (default: 20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each recording (default: 30)")
    parser.add_argument("--jobs", type=int, action="append", help="workers of one job (repeatable; default: 1 and 2)")
    parser.add_argument("--engine", choices=("pool", "ray"), default="pool")
    parser.add_argument("--run", type=Path, help="a finished run folder to use instead of training ds_cnn briefly")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray: the figure is this machine's

    with tempfile.TemporaryDirectory(prefix="manifest-throughput-") as folder:
        folder = Path(folder)
        run_root = args.run or train_brief({"model_architecture": "ds_cnn"}, folder / "models")
        recordings = folder / "recordings"
        recordings.mkdir()
        for index in range(args.files):
            write_long_recording(recordings / f"{index:03d}.wav", args.seconds, seed=index)
        manifest = recordings / "files.txt"
        manifest.write_text("".join(f"{index:03d}.wav\n" for index in range(args.files)))
        rows = []
        for jobs in args.jobs or [1, 2]:
            row = time_job(manifest, Path(run_root).parent, Path(run_root).name, jobs, args.engine)
            rows.append(row)
            print(row, flush=True)

    print(f"\nCPU cores: {os.cpu_count()}, load average (1 min) at the start: {load_at_start:.1f}, "
          f"at the end: {os.getloadavg()[0]:.1f}; engine {args.engine}; {args.files} files of {args.seconds:g} s")
    print("| --jobs | wall time | first line | files/s | audio s per wall s | after the first line | vs --jobs "
          f"{rows[0]['jobs']} |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['jobs']} | {row['wall_s']:.1f} s | {row['first_s']:.1f} s | {row['files_per_s']:.2f} | "
              f"{row['audio_per_s']:.0f} | {row['steady_audio_per_s']:.0f} | "
              f"{rows[0]['wall_s'] / row['wall_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
