"""Command lines: ``speechclas-train``, ``speechclas-predict`` and ``speechclas-detect``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

logger = logging.getLogger(__name__)


def _setup_logging(verbose: bool) -> None:
    # TensorFlow's C++ start-up chatter hides the lines a person wants.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("absl", "tensorflow", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _limits_and_models_dir(parser: argparse.ArgumentParser, models_dir: str | None):
    """The operator's limits and the models folder (--models-dir, else etc/config.yaml's);
    a malformed setting or config is a usage error naming it."""
    from pathlib import Path

    from speechclas.config import ConfigError, load_config
    from speechclas.limits import Limits, OperatorSettingError

    try:
        return Limits.from_env(), Path(models_dir) if models_dir else load_config().path("models_dir")
    except (ConfigError, OperatorSettingError) as exc:
        parser.error(str(exc))


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechclas-train",
        description="Train a keyword classifier. Parameters and their defaults are in etc/config.yaml; "
        "override any with key=value (lists comma-separated, e.g. how_many_training_steps=1000,300).",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", help="configuration file (default: etc/config.yaml of the project)")
    parser.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)

    from speechclas.config import ConfigError, load_config, parse_cli_overrides
    from speechclas.data import DataError
    from speechclas.limits import Limits, OperatorSettingError

    try:
        config = load_config(parse_cli_overrides(args.overrides), path=args.config)
        limits = Limits.from_env()
    except (ConfigError, OperatorSettingError) as exc:
        parser.error(str(exc))

    from speechclas.archive import ArchiveError
    from speechclas.distribution import DistributionError
    from speechclas.fetch import FetchError
    from speechclas.tracking import tracker_from_env
    from speechclas.train import train

    try:
        tracker = tracker_from_env(os.environ, limits.mlflow_model_name)
        result = train(config, progress=not args.no_progress and sys.stderr.isatty(), limits=limits, tracker=tracker)
    except (DataError, ArchiveError, FetchError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    except DistributionError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("Interrupted: the run folder is left unfinished and will not be served")
        return 130
    print(json.dumps(result.summary(), indent=2))
    return 0


def prepare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechclas-prepare",
        description="Decode a data folder once into TFRecord shards in the shard cache (SPEECHCLAS_SHARD_CACHE_DIR, "
        "default data/shards/), as the first training on it would; later trainings with the same clips, split "
        "and decoding reuse them. key=value parameters of etc/config.yaml set the split and the decoding "
        "(sample_rate, clip_duration_ms, validation_percentage, testing_percentage, data_splits_dir).",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder of label folders of clips")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", help="configuration file (default: etc/config.yaml of the project)")
    parser.add_argument("--jobs", type=int, help="decoding processes (default: the number of CPUs; 1: this process)")
    parser.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)

    from pathlib import Path

    from speechclas.audio import AudioLimits
    from speechclas.config import ConfigError, load_config, parse_cli_overrides
    from speechclas.data import DataError, index_dataset
    from speechclas.features import settings_from_config
    from speechclas.limits import Limits, OperatorSettingError
    from speechclas.shards import prepare, shard_cache

    try:
        overrides = {**parse_cli_overrides(args.overrides), "data_dir": args.data_dir}
        config = load_config(overrides, path=args.config)
        limits = Limits.from_env()
    except (ConfigError, OperatorSettingError) as exc:
        parser.error(str(exc))
    settings = settings_from_config(config)
    started = time.monotonic()
    try:
        index = index_dataset(Path(args.data_dir), config.wanted_words, config.validation_percentage,
                              config.testing_percentage, config.path("data_splits_dir"))
        cache = shard_cache(limits.shard_cache_dir, limits.shard_cache_bytes)
        with prepare(cache, index, settings.sample_rate, settings.desired_samples, AudioLimits.from_limits(limits),
                     jobs=args.jobs, progress=not args.no_progress and sys.stderr.isatty()) as prepared:
            summary = {"shards": str(prepared.folder), "clips": {s: prepared.clip_count(s) for s in prepared.counts},
                       "files": sum(len(files) for files in prepared.files.values()),
                       "skipped_clips": len(prepared.skipped), "duration_s": round(time.monotonic() - started, 1)}
    except DataError as exc:
        logger.error("%s", exc)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechclas-predict",
        description="Classify one audio file or http(s) URL with a trained run and print the JSON "
        "the API answers. URLs to private or loopback addresses are refused unless "
        "SPEECHCLAS_ALLOW_PRIVATE_URLS=1. A folder or a split list (.txt of <label>/<file> lines) is "
        "predicted as a batch into models/<run>/predictions/<name>.json, with statistics in stats/.",
    )
    parser.add_argument("source", metavar="FILE_OR_URL",
                        help="audio file (wav, flac, ogg), http(s) URL of one, folder, or split list (.txt)")
    parser.add_argument("--data-dir", help="batch: folder the split list's lines are relative to "
                        "(default: the data the run was trained on)")
    parser.add_argument("--name", help="batch: name of the stored predictions (default: from the source)")
    parser.add_argument("--run", help="run folder in the models folder (default: models/api, else the newest finished run)")
    parser.add_argument("--top-k", type=int, default=5, help="number of labels to print (default: 5)")
    parser.add_argument("--models-dir", help="folder of trained runs (default: models_dir of etc/config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    _setup_logging(args.verbose)

    from pathlib import Path
    from urllib.parse import urlsplit

    from speechclas.audio import AudioError
    from speechclas.fetch import FetchError
    from speechclas.predict import (
        InputError,
        PredictorCache,
        predict_request,
    )
    from speechclas.rundir import RunNotFoundError

    limits, models_dir = _limits_and_models_dir(parser, args.models_dir)
    is_url = urlsplit(args.source).scheme.lower() in ("http", "https")
    if not is_url and (Path(args.source).is_dir() or args.source.lower().endswith(".txt")):
        from speechclas.batch import run_batch

        try:
            batch = run_batch(models_dir, Path(args.source), run=args.run, name=args.name, top_k=args.top_k,
                              data_dir=Path(args.data_dir) if args.data_dir else None, progress=sys.stderr.isatty(),
                              limits=limits)
        except (InputError, RunNotFoundError) as exc:
            logger.error("%s", exc)
            return 2
        print(json.dumps(batch.describe(), indent=2))
        return 0
    try:
        result = predict_request(
            PredictorCache(max_runs=1),
            models_dir,
            file=None if is_url else Path(args.source),
            url=args.source if is_url else None,
            run=args.run,
            top_k=args.top_k,
            limits=limits,
        )
    except (InputError, AudioError, FetchError, RunNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    print(json.dumps({"status": "ok", **result}, indent=2))
    return 0


def detect_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechclas-detect",
        description="Find every keyword in a long recording (any length, any format the decoder reads) "
        "and print the JSON predict mode=detect answers: each detection's label, start_s, end_s and "
        "smoothed score. Scores are averaged over --average-window-ms; a label fires above --threshold; "
        "none fires within --suppression-ms of the previous one. With --manifest, every recording a file "
        "lists gets one JSON line in --out, and a job run again goes on where it stopped.",
    )
    parser.add_argument("source", metavar="AUDIO", nargs="?",
                        help="audio file (wav, flac, ogg, mp3) or http(s) URL of one")
    parser.add_argument("--run", help="run folder in the models folder (default: models/api, else the newest finished run)")
    parser.add_argument("--models-dir", help="folder of trained runs (default: models_dir of etc/config.yaml)")
    parser.add_argument("--threshold", type=float,
                        help="smoothed score a detection needs, 0 to 1 (default: the run's calibrated "
                        "threshold, else 0.7)")  # fmt: skip
    parser.add_argument("--hop-ms", type=float,
                        help="time between two scored windows, a multiple of the frame stride (default: two strides)")
    parser.add_argument("--average-window-ms", type=float, help="scores averaged over this time (default: 500)")
    parser.add_argument("--suppression-ms", type=float, help="no detection this soon after another (default: 1500)")
    parser.add_argument("--max-seconds", type=float, help="longest audio accepted (default: 24 h)")
    parser.add_argument("--manifest", metavar="FILES.txt",
                        help="detect in every recording this file lists: one path (relative to its folder) or "
                        "http(s) URL a line; blank lines and # comments are skipped")  # fmt: skip
    parser.add_argument("--out", metavar="RESULTS.jsonl",
                        help="with --manifest: one JSON line per recording is appended here; files it already "
                        "answers are skipped")  # fmt: skip
    parser.add_argument("--jobs", type=int, help="with --manifest: worker processes (default: the number of CPUs; "
                        "with --engine ray, the cluster's CPUs)")  # fmt: skip
    parser.add_argument("--engine", choices=("pool", "ray"),
                        help="with --manifest: pool, processes on this machine (default), or ray, Ray Data on the "
                        "cluster of RAY_ADDRESS, else a local Ray (pip install 'speechclas[ray]')")  # fmt: skip
    parser.add_argument("--retry-errors", action="store_true",
                        help="with --manifest: detect again in the files --out holds an error line for")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.manifest and args.source:
        parser.error("give either one AUDIO file or URL, or --manifest, not both")
    if not args.manifest and not args.source:
        parser.error("give an AUDIO file or URL, or --manifest FILES.txt --out RESULTS.jsonl")
    if args.manifest and not args.out:
        parser.error("--manifest needs --out RESULTS.jsonl, the file its results are appended to")
    manifest_only = [name for name, value in (("--out", args.out), ("--jobs", args.jobs), ("--engine", args.engine),
                                              ("--retry-errors", args.retry_errors)) if value not in (None, False)]  # fmt: skip
    if manifest_only and not args.manifest:
        parser.error(f"{', '.join(manifest_only)}: only with --manifest (a job over many recordings)")
    _setup_logging(args.verbose)

    from pathlib import Path
    from urllib.parse import urlsplit

    from speechclas.audio import AudioError
    from speechclas.detect import CLI_MAX_SECONDS, ScorerCache, detect_request
    from speechclas.fetch import FetchError
    from speechclas.predict import InputError
    from speechclas.rundir import RunNotFoundError

    limits, models_dir = _limits_and_models_dir(parser, args.models_dir)
    max_seconds, max_seconds_setting = args.max_seconds or CLI_MAX_SECONDS, "--max-seconds of speechclas-detect"
    if args.manifest:
        from speechclas.manifest import DetectOptions, JobStopped, ManifestError, detect_manifest

        options = DetectOptions(max_seconds, max_seconds_setting, run=args.run, threshold=args.threshold,
                                hop_ms=args.hop_ms, average_window_ms=args.average_window_ms,
                                suppression_ms=args.suppression_ms)  # fmt: skip
        try:
            summary = detect_manifest(Path(args.manifest), Path(args.out), models_dir, options, limits=limits,
                                      jobs=args.jobs, engine=args.engine or "pool", retry_errors=args.retry_errors,
                                      progress=not args.no_progress and sys.stderr.isatty())  # fmt: skip
        except (ManifestError, InputError, RunNotFoundError) as exc:
            logger.error("%s", exc)
            return 2
        except JobStopped as exc:
            logger.error("The job stopped: %s. The lines written are kept in %s; the same command goes on "
                         "from there", exc, args.out)  # fmt: skip
            return 1
        except KeyboardInterrupt:
            logger.error("Interrupted. The lines written are kept in %s; the same command goes on from there",
                         args.out)  # fmt: skip
            return 130
        print(json.dumps(summary, indent=2))
        return 0
    is_url = urlsplit(args.source).scheme.lower() in ("http", "https")
    try:
        result = detect_request(
            ScorerCache(max_runs=1),
            models_dir,
            file=None if is_url else Path(args.source),
            url=args.source if is_url else None,
            run=args.run,
            threshold=args.threshold,
            hop_ms=args.hop_ms,
            average_window_ms=args.average_window_ms,
            suppression_ms=args.suppression_ms,
            limits=limits,
            max_seconds=max_seconds,
            max_seconds_setting=max_seconds_setting,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except (InputError, AudioError, FetchError, RunNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
