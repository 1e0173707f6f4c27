"""Training data larger than memory: preparation time, steps/s streamed against in memory,
and peak RSS, for datasets of growing size (issue 16).

Each dataset is data/demo's clips hard-linked under many speaker names
(`<word>/s<k>_nohash_0.wav`, every speaker saying every word once, so the
speaker hash spreads them over the splits as it spreads real speakers); its
_background_noise_ is linked as is. For each size, every measurement runs in
a fresh subprocess, so its peak RSS (getrusage's ru_maxrss) is its own:

- prepare: index the folder and decode it into shards in a fresh shard cache
  (cold), then once more in another process (reuse: index, stat and hash only);
- stream / memory: `train.prepare_data` with data_loading=stream or memory,
  the training pipeline, the network, optimizer and compiled train step, then
  --steps timed steps after --warmup untimed ones (the first of which fills
  the shuffle buffers), then optionally the pipeline alone (no model). With
  --repeats the two modes alternate, each figure is the median of the runs,
  and streamed / in memory is the median ratio of the runs made one after the
  other, so a spell of other work on a shared machine weighs on both sides of
  a ratio. Each run also records the cores it got (CPU time / wall time of
  its timed steps): on a shared machine, compare runs that got the same.

In memory runs only up to --memory-max-clips clips and when the machine has
the memory it needs; the shards of a size are deleted after it unless
--keep. Every figure of a size comes from the same run of this script, so
ratios hold better on a busy machine than absolute figures.

    python benchmarks/scale.py --sizes 2000,10000            # a quick check
    python benchmarks/scale.py                               # 10k, 100k, 300k (or what the disk allows)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
RESULT_PREFIX = "SCALE_RESULT "
BACKGROUND = "_background_noise_"
COMPLETE = ".scale-complete"
# Bytes of one shard record: 1 s of int16 at 16 kHz plus the Example's strings and framing.
RECORD_BYTES = 32_000 + 250
DISK_MARGIN = 3 * 2**30  # left free on the disk after the largest size's shards
# What data_loading=memory holds at its peak, in multiples of the decoded clips (16.4 GB for 100k clips here).
MEMORY_FACTOR = 5.0
GOAL_RATIO = 0.9
PREFETCHED = 8  # batches pulled before timing the pipeline alone: more than its prefetch buffer holds
GOAL_FLAT = 0.10
GOAL_RSS_BYTES = 3 * 10**9


# --- the datasets ------------------------------------------------------------------------


def demo_clips(demo: Path) -> dict[str, list[Path]]:
    """data/demo's word folders and their clips, sorted."""
    words = sorted(p for p in demo.iterdir() if p.is_dir() and p.name != BACKGROUND and not p.name.startswith("."))
    return {w.name: sorted(w.glob("*.wav")) for w in words}


def make_dataset(folder: Path, clips: int, demo: Path) -> tuple[float, bool]:
    """`clips` hard links of the demo's clips in `folder` (reused when a complete one is there);
    answers (seconds, reused). Clip c is word c % words of speaker c // words."""
    marker = folder / COMPLETE
    if marker.is_file() and marker.read_text().strip() == str(clips):
        return 0.0, True
    started = time.monotonic()
    if folder.exists():
        shutil.rmtree(folder)
    sources = demo_clips(demo)
    words = sorted(sources)
    for word in words:
        (folder / word).mkdir(parents=True)
    shutil.copytree(demo / BACKGROUND, folder / BACKGROUND, copy_function=_link)
    for number in range(clips):
        word = words[number % len(words)]
        speaker = number // len(words)
        source = sources[word][speaker % len(sources[word])]
        _link(source, folder / word / f"s{speaker:06d}_nohash_0.wav")
    marker.write_text(f"{clips}\n")
    return time.monotonic() - started, False


def _link(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system: a copy
        shutil.copy2(source, target)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def evict_page_cache(folder: Path) -> None:
    """Drop the page cache of the shard files (only theirs), so a streamed run reads them from disk."""
    for path in folder.rglob("*.tfrecord"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- the children: each measurement in its own process ------------------------------------


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _config(args, data_loading: str):
    from speechclas.config import load_config

    return load_config({"data_dir": str(args.data_dir), "model_architecture": args.architecture,
                        "batch_size": args.batch_size, "data_loading": data_loading,
                        "shuffle_buffer": args.shuffle_buffer})


def _limits(args):
    from speechclas.limits import Limits

    # Memory or stream is chosen by data_loading itself; the cache is this size's own and never evicts.
    return Limits.defaults().replace(shard_cache_dir=str(args.cache_dir), shard_cache_bytes=2**50,
                                     in_memory_max_mb=2**20)


def child_prepare(args) -> dict:
    """Index the folder and prepare its shards (decoded now, or reused when the cache has them).
    TensorFlow (which writes the shards) is started first, outside the time (about 5 s here)."""
    import tensorflow  # noqa: F401

    from speechclas import shards
    from speechclas.audio import AudioLimits
    from speechclas.data import index_dataset
    from speechclas.features import settings_from_config

    config = _config(args, "stream")
    settings = settings_from_config(config)
    limits = _limits(args)
    started = time.perf_counter()
    index = index_dataset(args.data_dir, config.wanted_words, config.validation_percentage,
                          config.testing_percentage, args.splits_dir)
    indexed = time.perf_counter()
    cache = shards.shard_cache(limits.shard_cache_dir, limits.shard_cache_bytes)
    cpu = time.process_time()
    with shards.prepare(cache, index, settings.sample_rate, settings.desired_samples, AudioLimits.from_limits(limits),
                        jobs=args.jobs, progress=False) as prepared:
        counts = {split: prepared.clip_count(split) for split in prepared.counts}
        files = sum(len(f) for f in prepared.files.values())
        folder = prepared.folder
    finished = time.perf_counter()
    return {"seconds": finished - started, "index_seconds": indexed - started, "cpu_seconds": time.process_time() - cpu,
            "clips": counts, "files": files, "skipped": len(prepared.skipped), "shard_bytes": tree_bytes(folder),
            "peak_rss": _peak_rss_bytes()}


def child_train(args) -> dict:
    """prepare_data + the training pipeline, network and train step as a training builds them; time
    --steps steps after --warmup, then the pipeline alone."""
    import tensorflow as tf

    from speechclas import train
    from speechclas.features import settings_from_config

    config = _config(args, args.mode)
    settings = settings_from_config(config)
    started = time.perf_counter()
    prepared = train.prepare_data(config, settings, args.data_dir, args.splits_dir, _limits(args))
    assert prepared.streamed == (args.mode == "stream"), (args.mode, prepared.streamed)
    loaded = time.perf_counter()
    rss_loaded = _current_rss_bytes()
    tf.random.set_seed(config.random_seed)
    dataset = train.training_pipeline(config, settings, prepared.training)
    batches = iter(dataset)
    model = train.build_network(config, settings, len(prepared.index.labels), batches)
    optimizer = train.make_optimizer(config.optimizer, config.learning_rate[0], config.weight_decay)
    train.exclude_from_weight_decay(optimizer, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    step = train.make_train_step(model, optimizer, tf.Variable(0, dtype=tf.int64), config.check_nans,
                                 config.label_smoothing)
    built = time.perf_counter()

    step_seconds = []

    def run_steps(count: int) -> None:  # as train.fit runs them: each step's loss read back
        for _ in range(count):
            begun = time.perf_counter()
            features, targets = next(batches)
            float(step(features, targets)[0])
            step_seconds.append(time.perf_counter() - begun)

    run_steps(1)  # fills the shuffle buffers and traces the step
    first = time.perf_counter()
    run_steps(args.warmup - 1)
    timed, cpu = time.perf_counter(), time.process_time()
    del step_seconds[:]
    run_steps(args.steps)
    elapsed, cpu_used = time.perf_counter() - timed, time.process_time() - cpu
    result = {"mode": args.mode, "steps": args.steps, "steps_per_s": args.steps / elapsed,
              # The median step: a burst of other work on a shared machine moves it less than the mean.
              "median_steps_per_s": 1 / statistics.median(step_seconds), "cores": cpu_used / elapsed,
              "cpu_ms_per_step": 1000 * cpu_used / args.steps, "load_seconds": loaded - started,
              "first_batch_seconds": first - built, "rss_after_load": rss_loaded,
              "training_clips": _training_clips(prepared), "parameters": int(model.count_params())}
    if args.pipeline_batches:
        for _ in range(PREFETCHED):  # what the prefetch buffer already holds
            next(batches)
        pulled = time.perf_counter()
        for _ in range(args.pipeline_batches):
            next(batches)
        result["pipeline_samples_per_s"] = args.pipeline_batches * config.batch_size / (time.perf_counter() - pulled)
    result["peak_rss"] = _peak_rss_bytes()
    return result


def _training_clips(prepared) -> int:
    if prepared.streamed:
        return prepared.shards.clip_count("training")
    return len(prepared.training.wanted_audio) + len(prepared.training.unknown_audio)


def run_child(args, kind: str, data_dir: Path, cache_dir: Path, splits_dir: Path, log, mode: str = "") -> dict:
    """One measurement in a fresh interpreter; its stderr goes to `log`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data-dir", str(data_dir),
               "--cache-dir", str(cache_dir), "--splits-dir", str(splits_dir), "--architecture", args.architecture,
               "--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--pipeline-batches",
               str(args.pipeline_batches)]
    if args.jobs:
        command += ["--jobs", str(args.jobs)]
    if mode:
        command += ["--mode", mode]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SPEECHCLAS_SHARD_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log.write(f"\n=== {kind} {mode} {data_dir} ===\n")
    log.flush()
    started = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT,
                               timeout=args.child_timeout)
    wall = time.perf_counter() - started
    load = os.getloadavg()[0]  # the machine's 1-minute load as the measurement ends (others' work included)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "process_seconds": wall, "load_average": load}
    raise RuntimeError(f"{kind} {mode} on {data_dir} failed (exit {completed.returncode}); see {log.name}")


# --- the parent ----------------------------------------------------------------------------


@dataclasses.dataclass
class SizeResult:
    clips: int
    dataset_seconds: float = 0.0
    prepare: dict | None = None
    reuse: dict | None = None
    stream: dict | None = None
    memory: dict | None = None
    memory_skipped: str = ""
    note: str = ""
    runs: list[dict] = dataclasses.field(default_factory=list)  # every training measurement, in order
    ratio: float | None = None  # streamed / in memory, paired_ratio


def summary(runs: list[dict], mode: str) -> dict | None:
    """A mode's runs together: the median of each figure, the highest peak RSS."""
    mine = [run for run in runs if run["mode"] == mode]
    if not mine:
        return None
    numbers = [key for key, value in mine[0].items() if isinstance(value, (int, float)) and key != "peak_rss"]
    return {"mode": mode, "runs": len(mine), "peak_rss": max(run["peak_rss"] for run in mine),
            **{key: statistics.median(run[key] for run in mine if key in run) for key in numbers}}


def paired_ratio(runs: list[dict]) -> float | None:
    """streamed / in-memory steps/s, the median over the pairs of runs made one after the other
    (stream then memory, memory then stream, ...): each pair shares the machine's load of its time."""
    streamed = [run["steps_per_s"] for run in runs if run["mode"] == "stream"]
    memory = [run["steps_per_s"] for run in runs if run["mode"] == "memory"]
    ratios = [s / m for s, m in zip(streamed, memory, strict=False)]
    return statistics.median(ratios) if ratios else None


def memory_skip_reason(clips: int, args) -> str:
    """Why data_loading=memory is not measured at this size ('' when it is)."""
    if clips > args.memory_max_clips:
        return f"above --memory-max-clips {args.memory_max_clips}"
    needed = MEMORY_FACTOR * clips * 32_000 + 2 * 2**30
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        return ""
    if needed > available:
        return f"needs about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    return ""


def fitting_size(requested: int, work_dir: Path, keep_bytes: int) -> int:
    """The largest size up to `requested` whose shards fit the free disk with DISK_MARGIN (0: none)."""
    free = shutil.disk_usage(work_dir).free - keep_bytes - DISK_MARGIN
    fits = int(free // (RECORD_BYTES * 1.02))
    if fits >= requested:
        return requested
    return (fits // 10_000) * 10_000


def measure_size(clips: int, args, log) -> SizeResult:
    result = SizeResult(clips)
    data_dir = args.work_dir / f"data-{clips}"
    cache_dir = args.work_dir / f"shards-{clips}"
    splits_dir = args.work_dir / "no-splits"  # never holds split lists: the speaker hash splits
    result.dataset_seconds, reused = make_dataset(data_dir, clips, args.demo)
    print(f"[{clips}] dataset {'reused' if reused else f'linked in {result.dataset_seconds:.1f} s'}: {data_dir}",
          flush=True)
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    try:
        result.prepare = run_child(args, "prepare", data_dir, cache_dir, splits_dir, log)
        print(f"[{clips}] prepared in {result.prepare['seconds']:.1f} s "
              f"({result.prepare['shard_bytes'] / 1e9:.2f} GB of shards)", flush=True)
        result.reuse = run_child(args, "prepare", data_dir, cache_dir, splits_dir, log)
        print(f"[{clips}] reused in {result.reuse['seconds']:.2f} s", flush=True)
        result.memory_skipped = memory_skip_reason(clips, args)
        if result.memory_skipped:
            print(f"[{clips}] in memory skipped: {result.memory_skipped}", flush=True)
        modes = ["stream"] if result.memory_skipped else ["stream", "memory"]
        for repeat in range(args.repeats):
            for mode in modes if repeat % 2 == 0 else modes[::-1]:  # alternated: a busy spell hits both
                if args.cold_shards and mode == "stream":
                    evict_page_cache(cache_dir)
                run = run_child(args, "train", data_dir, cache_dir, splits_dir, log, mode=mode)
                result.runs.append(run)
                print(f"[{clips}] {mode}: {run['steps_per_s']:.2f} steps/s, {run['cpu_ms_per_step']:.0f} CPU-ms/step, "
                      f"{run['cores']:.2f} cores, peak RSS {run['peak_rss'] / 2**20:.0f} MiB, load {run['load_average']:.1f}", flush=True)
        result.stream = summary(result.runs, "stream")
        result.memory = summary(result.runs, "memory")
        result.ratio = paired_ratio(result.runs)
    finally:
        if not args.keep and cache_dir.exists():
            shutil.rmtree(cache_dir)
    return result


def _mib(value: int | None) -> str:
    return f"{value / 2**20:,.0f} MiB" if value else "–"


def table(results: list[SizeResult]) -> str:
    lines = ["| clips | prepare (s) | reuse (s) | streamed steps/s | in-memory steps/s | streamed / in memory "
             "| streamed peak RSS | in-memory peak RSS |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        memory = f"{r.memory['steps_per_s']:.2f}" if r.memory else "skipped"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "–"
        lines.append(f"| {r.clips:,}{r.note} | {r.prepare['seconds']:.1f} | {r.reuse['seconds']:.2f} | "
                     f"{r.stream['steps_per_s']:.2f} | {memory} | {ratio} | {_mib(r.stream['peak_rss'])} | "
                     f"{_mib(r.memory['peak_rss']) if r.memory else '–'} |")
    return "\n".join(lines)


def detail_table(results: list[SizeResult]) -> str:
    lines = ["| clips | shards | prepare clips/s | prepare peak RSS | first batch s (stream / memory) | "
             "load s (stream / memory) | CPU-ms/step (stream / memory) | pipeline alone samples/s (stream / memory) "
             "| machine load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def pair(key: str, fmt: str, r: SizeResult) -> str:
        left = format(r.stream[key], fmt) if key in r.stream else "–"
        right = format(r.memory[key], fmt) if r.memory and key in r.memory else "–"
        return f"{left} / {right}"

    for r in results:
        p = r.prepare
        lines.append(f"| {r.clips:,} | {p['files']} files, {p['shard_bytes'] / 1e9:.2f} GB | "
                     f"{r.clips / p['seconds']:,.0f} | {_mib(p['peak_rss'])} | {pair('first_batch_seconds', '.1f', r)} "
                     f"| {pair('load_seconds', '.1f', r)} | {pair('cpu_ms_per_step', '.0f', r)} | "
                     f"{pair('pipeline_samples_per_s', ',.0f', r)} | {_load_range(r.runs)} |")
    return "\n".join(lines)


def _load_range(runs: list[dict]) -> str:
    loads = [run["load_average"] for run in runs]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "–"


def goals(results: list[SizeResult]) -> list[str]:
    lines = []
    at_10k = next((r for r in results if r.clips >= 10_000 and r.memory), None)
    if at_10k:
        ratio = at_10k.ratio
        cpu_ratio = at_10k.memory["cpu_ms_per_step"] / at_10k.stream["cpu_ms_per_step"]
        lines.append(f"streamed / in memory at {at_10k.clips:,} clips: {ratio:.2f} (goal >= {GOAL_RATIO}): "
                     f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}; by CPU time per step (what bounds a "
                     f"step on a machine of its own): {cpu_ratio:.2f}")
    large = [r for r in results if r.clips >= 100_000]
    if len(large) >= 2:
        peaks = [r.stream["peak_rss"] for r in large]
        spread = max(peaks) / min(peaks) - 1
        lines.append(f"streamed peak RSS from {large[0].clips:,} to {large[-1].clips:,} clips: "
                     f"{min(peaks) / 2**20:,.0f}-{max(peaks) / 2**20:,.0f} MiB, spread {100 * spread:.1f} % "
                     f"(goal <= {100 * GOAL_FLAT:.0f} %): {'met' if spread <= GOAL_FLAT else 'NOT met'}; "
                     f"largest {max(peaks) / 1e9:.2f} GB (goal <= 3 GB): "
                     f"{'met' if max(peaks) <= GOAL_RSS_BYTES else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,300000",
                        help="clips per dataset, comma-separated; the last is lowered to what the disk allows")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "speechclas-scale",
                        help="datasets (kept, reused), shard caches (removed unless --keep), log and JSON")
    parser.add_argument("--out", type=Path, help="the figures as JSON (default: WORK_DIR/scale.json)")
    parser.add_argument("--demo", type=Path, default=DEMO, help="folder whose clips are linked")
    parser.add_argument("--architecture", default="ds_cnn")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000, help="shuffle_buffer of the streamed runs")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (the first fills the buffers)")
    parser.add_argument("--pipeline-batches", type=int, default=50, help="batches of the pipeline alone (0: none)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="training measurements of each mode per size, alternated; medians are reported")
    parser.add_argument("--memory-max-clips", type=int, default=100_000, help="largest size measured in memory")
    parser.add_argument("--jobs", type=int, help="decoding threads of the preparation (default: every CPU)")
    parser.add_argument("--cold-shards", action="store_true",
                        help="drop the shards' pages from the page cache before each streamed run")
    parser.add_argument("--keep", action="store_true", help="keep each size's shards")
    parser.add_argument("--child-timeout", type=float, default=3600.0)
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of an earlier run's JSON")
    # A measurement's own process (internal).
    parser.add_argument("--child", choices=["prepare", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["stream", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--splits-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        result = child_prepare(args) if args.child == "prepare" else child_train(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    if args.report:
        report([size_result(item) for item in json.loads(args.report.read_text())["sizes"]])
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work_dir / "scale.json"
    log_path = args.work_dir / "scale.log"
    import psutil  # noqa: F401  (the memory check needs it; fail early)

    print(f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB memory, "
          f"{shutil.disk_usage(args.work_dir).free / 1e9:.0f} GB free in {args.work_dir}; "
          f"{args.architecture}, batch {args.batch_size}, shuffle_buffer {args.shuffle_buffer}, "
          f"{args.steps} steps after {args.warmup}; log {log_path}", flush=True)
    results: list[SizeResult] = []
    started = time.monotonic()
    with open(log_path, "a") as log:
        for number, clips in enumerate(sizes):
            kept = sum(RECORD_BYTES * r.clips for r in results) if args.keep else 0
            fits = fitting_size(clips, args.work_dir, kept)
            note = ""
            if fits < clips:
                if number < len(sizes) - 1 or fits < 10_000:
                    print(f"[{clips}] skipped: its shards do not fit the free disk", flush=True)
                    continue
                print(f"[{clips}] lowered to {fits} clips, what the free disk allows", flush=True)
                note, clips = f" (asked {clips:,})", fits
            result = measure_size(clips, args, log)
            result.note = note
            results.append(result)
            out.write_text(json.dumps({"sizes": [dataclasses.asdict(r) for r in results], "args": {
                k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}, indent=1))
    print(f"\nTotal {time.monotonic() - started:.0f} s; figures in {out}\n")
    report(results)
    return 0


def size_result(item: dict) -> SizeResult:
    """A size's figures from the JSON, summarised again from its runs."""
    result = SizeResult(**{k: v for k, v in item.items() if k not in ("stream", "memory", "ratio")})
    result.stream, result.memory = summary(result.runs, "stream"), summary(result.runs, "memory")
    result.ratio = paired_ratio(result.runs)
    return result


def report(results: list[SizeResult]) -> None:
    print(table(results))
    print()
    print(detail_table(results))
    print()
    for r in results:
        if r.memory_skipped:
            print(f"in memory at {r.clips:,} clips skipped: {r.memory_skipped}")
    for r in results:
        runs = ", ".join(f"{run['mode']} {run['steps_per_s']:.2f} on {run['cores']:.2f}" for run in r.runs)
        print(f"runs at {r.clips:,} clips, in order (steps/s on cores): {runs}")
    for line in goals(results):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
