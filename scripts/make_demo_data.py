"""Make a small synthetic keyword dataset with the espeak-ng speech synthesizer.

The project ships a demo dataset so that training, the tests and the DEEPaaS
API can run without downloading the 2 GB speech_commands corpus.  The clips
follow the speech_commands layout (`<word>/<speaker>_nohash_<n>.wav`, 1 s of
16 kHz 16-bit mono), so the same code paths (speaker-hash split, unknown words,
`_background_noise_`) are exercised.  Each synthetic speaker is one combination
of espeak-ng accent, voice variant, pitch, speed and level, so a classifier has
to generalise across speakers just as with real recordings.

Everything is drawn from `--seed`: running the script again with the same
arguments and espeak-ng version writes the same files.

    python scripts/make_demo_data.py --out data/demo
    python scripts/make_demo_data.py --out /tmp/demo30 --speakers 120 --words all30 --unknown-words ""
"""

import argparse
import hashlib
import io
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from speechclas import lexicon
from speechclas.noise import NOISE_KINDS, write_background_noise
from speechclas.voices import ESPEAK_ACCENTS, ESPEAK_VARIANTS, LEVEL_DB_RANGE, NOISE_DB_RANGE, shape_clip, to_pcm16

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # 1000 ms, like speech_commands
BACKGROUND_NOISE_DIR = "_background_noise_"
INSTALLER = Path(__file__).resolve().parent / "install_espeak.sh"

# The 35 words of speech_commands v0.02; "all30" is the first 30 (the v0.01
# vocabulary), "all35" all of them.
SPEECH_COMMANDS_WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "backward", "forward", "follow", "learn", "visual",
)  # fmt: skip
DEFAULT_WORDS = SPEECH_COMMANDS_WORDS[:10]
DEFAULT_UNKNOWN_WORDS = SPEECH_COMMANDS_WORDS[10:30]  # the 20 other words of v0.01, as _unknown_
DEFAULT_NEAR_MISSES = 20  # near-misses of the keywords (speechclas.lexicon), each said by a few speakers
DEFAULT_NEAR_MISS_SPEAKERS = 8

# English accents that espeak-ng ships itself (the mbrola "mb-*" voices need
# extra packages; "en" is the same voice as "en-gb") and the voice variants
# (`espeak-ng --voices=variant`) that still sound like speech.
VOICES = ESPEAK_ACCENTS
VARIANTS = ESPEAK_VARIANTS
PITCH_RANGE = (30, 70)  # espeak-ng -p, 0-99, default 50
SPEED_RANGE = (130, 200)  # espeak-ng -s, words per minute, default 175


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: everything that makes its voice differ from others.

    The level is applied after synthesis instead of espeak-ng's `-a`, because
    the raw output level differs a lot between variants (some clip at -a 100).
    """

    voice: str
    variant: str
    pitch: int
    speed: int
    level_db: float

    @property
    def id(self):
        """Short stable hex id, the `<speaker>` part of speech_commands names."""
        key = f"{self.voice}+{self.variant}|p{self.pitch}|s{self.speed}|l{self.level_db:.1f}"
        return hashlib.sha1(key.encode()).hexdigest()[:8]

    def espeak_args(self):
        return ["-v", f"{self.voice}+{self.variant}", "-p", str(self.pitch), "-s", str(self.speed)]


def _split_quotas(count, held_out_percentage=10.0):
    """Speakers per split so that speechclas' default 10/10 % hash split gets
    its share even on a small dataset (a plain draw of 32 can leave one split
    with a single speaker)."""
    if count < 10:
        return None
    held_out = max(1, round(count * held_out_percentage / 100))
    return {"validation": held_out, "testing": held_out, "training": count - 2 * held_out}


def _hash_split(speaker_id, held_out_percentage=10.0):
    """The split speechclas.data.which_set gives this speaker by default."""
    digest = hashlib.sha1(speaker_id.encode()).hexdigest()
    percentage = (int(digest, 16) % 2**27) * (100.0 / (2**27 - 1))
    if percentage < held_out_percentage:
        return "validation"
    if percentage < 2 * held_out_percentage:
        return "testing"
    return "training"


def choose_speakers(count, seed, voices=VOICES, variants=VARIANTS):
    """Draw `count` distinct speakers from `seed`, `voices` and `variants`.

    Accents go round-robin (in a seeded order) so that even 16 speakers cover
    every accent; the rest is drawn at random. A speaker whose hash split is
    already full is redrawn, so validation and testing get 10 % each.
    """
    rng = random.Random(seed)
    voices = list(voices)
    variants = list(variants)
    rng.shuffle(voices)
    quotas = _split_quotas(count)
    speakers, ids = [], set()
    while len(speakers) < count:
        speaker = Speaker(
            voice=voices[len(speakers) % len(voices)],
            variant=rng.choice(variants),
            pitch=rng.randint(*PITCH_RANGE),
            speed=rng.randint(*SPEED_RANGE),
            level_db=round(rng.uniform(*LEVEL_DB_RANGE), 1),
        )
        split = _hash_split(speaker.id)
        if speaker.id not in ids and (quotas is None or quotas[split] > 0):
            ids.add(speaker.id)
            speakers.append(speaker)
            if quotas is not None:
                quotas[split] -= 1
    return speakers


def ensure_espeak(installer=INSTALLER):
    """Install espeak-ng with `installer` when it is not on PATH (fresh machines)."""
    if shutil.which("espeak-ng"):
        return
    logger.warning("espeak-ng not found, installing it with %s", installer)
    subprocess.run(["bash", str(installer)], check=True)
    if not shutil.which("espeak-ng"):
        raise SystemExit("espeak-ng is still not on PATH after running " + str(installer))


def espeak_version():
    result = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.split("Data at:")[0].strip()


def synthesize(text, speaker):
    """Speak `text` with `speaker`; returns float32 samples and espeak's sample rate."""
    result = subprocess.run(
        ["espeak-ng", "--stdout", *speaker.espeak_args(), text], capture_output=True, check=True
    )
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if audio.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} with {speaker}")
    return audio, rate


def make_clip(word, speaker, path, seed, full_clip, sample_rate=SAMPLE_RATE, clip_samples=CLIP_SAMPLES, synth=None):
    """Synthesize `word` as `speaker` and write one 1 s clip to `path`.

    Each clip has its own random generator, seeded from the dataset seed, the
    speaker and the word, so the result does not depend on worker scheduling.
    `synth(word, speaker)` (default: espeak-ng's `synthesize`) lets another
    engine's voices go through the same post-processing; `speaker` then needs
    only an `id` and a `level_db`. Returns the length of the spoken word in
    seconds (before any cut to 1 s).
    """
    rng = random.Random(f"{seed}:{speaker.id}:{word}")
    audio, rate = (synth or synthesize)(word, speaker)
    clip, word_seconds = shape_clip(audio, rate, speaker.level_db, rng, sample_rate, clip_samples, full_clip)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, to_pcm16(clip), sample_rate, subtype="PCM_16")
    return word_seconds


def _make_clip_job(job):
    return make_clip(*job)


def write_readme(out_dir, command, words, unknown_words, speakers, noise_seconds, version, near=(), near_speakers=0):
    """Record how the data was made, next to the data."""
    rows = "\n".join(
        f"| {s.id} | {s.voice} | {s.variant} | {s.pitch} | {s.speed} | {s.level_db:.1f} |"
        for s in speakers
    )
    noise = (
        f"`{BACKGROUND_NOISE_DIR}/` holds {len(NOISE_KINDS)} noise recordings of "
        f"{noise_seconds:g} s each\n  ({', '.join(NOISE_KINDS)}), synthesized with numpy."
        if noise_seconds > 0
        else f"There is no `{BACKGROUND_NOISE_DIR}/` folder."
    )
    all_words = list(words) + list(unknown_words)
    low, high = NOISE_DB_RANGE
    text = f"""# Synthetic speech keyword dataset

Made by `scripts/make_demo_data.py` with the espeak-ng speech synthesizer
({version}):

    {command}

- {len(all_words)} words, {len(speakers)} speakers, {len(all_words) * len(speakers)} clips:
  every speaker says every word once.
- Keywords: {", ".join(words)}.
- Unknown (filler) words: {", ".join(unknown_words) or "none"}.
- Near-misses of the keywords (found by sound in speechclas' lexicon), each said by
  {near_speakers} of the speakers, {len(near) * min(near_speakers, len(speakers))} clips, also unknown: {", ".join(near) or "none"}.
- Layout and format as in speech_commands: `<word>/<speaker>_nohash_0.wav`,
  1 s clips of 16 kHz, 16-bit PCM, mono.
- {noise}

Each clip is the espeak-ng output resampled to 16 kHz (soxr), trimmed of its
leading and trailing silence, scaled to the speaker's level with a small random
gain, placed at a random offset inside 1 s of zeros (words longer than 1 s keep
their first second) and mixed with white noise at {low:g} to {high:g} dBFS RMS,
so that silence is not digital zero. A speaker is one combination of espeak-ng
accent (`-v`), voice variant (`+variant`), pitch (`-p`), speed (`-s`, words per
minute) and peak level; its id is the start of a SHA-1 of those parameters:

| speaker | voice | variant | pitch | speed | level (dBFS) |
|---|---|---|---|---|---|
{rows}

The words are synthetic speech: good for demos, smoke tests and benchmarks of
the pipeline, not for claims about accuracy on real speech.

License: synthetic data, made by this project; same license as the project
(Apache-2.0).
"""
    (out_dir / "README.md").write_text(text)


def parse_words(text, default):
    """Comma-separated words; "all30"/"all35" are the speech_commands vocabularies."""
    if text is None:
        return list(default)
    if text.strip() in ("all30", "all35"):
        return list(SPEECH_COMMANDS_WORDS[: int(text.strip()[3:])])
    return [word.strip() for word in text.split(",") if word.strip()]


def parse_names(text, default):
    """Comma-separated espeak-ng voice or variant names; None gives `default`."""
    if text is None:
        return list(default)
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--speakers", type=int, default=32, help="number of synthetic speakers")
    parser.add_argument(
        "--full-clips",
        action="store_true",
        help="write 1 s clips with the word at a random offset (default: the word with short "
        "margins, under 1 s, padded by the loader as speech_commands clips are)",
    )
    parser.add_argument(
        "--words",
        help='comma-separated keywords, or "all30"/"all35" for the speech_commands '
        f"vocabularies (default: {','.join(DEFAULT_WORDS)})",
    )
    parser.add_argument(
        "--unknown-words",
        help="comma-separated filler words, may be empty "
        f"(default: {','.join(DEFAULT_UNKNOWN_WORDS)})",
    )
    parser.add_argument(
        "--near-misses", type=int, default=DEFAULT_NEAR_MISSES,
        help="near-misses of the keywords found by sound in speechclas' lexicon (cup for up, top for "
        "stop), taken in turn over the keywords, as more unknown words; 0 writes none",
    )
    parser.add_argument(
        "--near-miss-speakers", type=int, default=DEFAULT_NEAR_MISS_SPEAKERS,
        help="speakers (of --speakers, drawn per word) who say each near-miss",
    )
    parser.add_argument(
        "--voices",
        help="comma-separated espeak-ng voices (`espeak-ng --voices`) to draw speakers from; "
        "another language's voice reads the English words with its own rules, an accent "
        f"(default: {','.join(VOICES)})",
    )
    parser.add_argument(
        "--variants",
        help="comma-separated espeak-ng voice variants (`espeak-ng --voices=variant`) to draw "
        "from (default: the 51 that still sound like speech, klatt..klatt5 included)",
    )
    parser.add_argument(
        "--exclude-variants",
        default="",
        help="comma-separated variants to leave out of --variants, e.g. to hold out a family",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for everything")
    parser.add_argument(
        "--noise-seconds",
        type=float,
        default=6.0,
        help="length of each _background_noise_ file; 0 writes none",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes"
    )
    args = parser.parse_args(argv)
    args.words = parse_words(args.words, DEFAULT_WORDS)
    args.unknown_words = [
        w for w in parse_words(args.unknown_words, DEFAULT_UNKNOWN_WORDS) if w not in args.words
    ]
    args.voices = parse_names(args.voices, VOICES)
    excluded = set(parse_names(args.exclude_variants, ()))
    args.variants = [v for v in parse_names(args.variants, VARIANTS) if v not in excluded]
    if args.speakers < 1 or not args.words:
        parser.error("need at least one speaker and one word")
    if not args.voices or not args.variants:
        parser.error("need at least one voice and one variant")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    ensure_espeak()
    started = time.monotonic()
    speakers = choose_speakers(args.speakers, args.seed, args.voices, args.variants)
    near = lexicon.nearest_in_turn(args.words, args.near_misses, reserved=args.words + args.unknown_words)
    words = args.words + args.unknown_words
    jobs = [
        (word, speaker, args.out / word / f"{speaker.id}_nohash_0.wav", args.seed, args.full_clips)
        for word in words
        for speaker in speakers
    ]
    jobs += [
        (word, speaker, args.out / word / f"{speaker.id}_nohash_0.wav", args.seed, args.full_clips)
        for word in near
        for speaker in random.Random(f"{args.seed}:{word}").sample(speakers, min(args.near_miss_speakers, len(speakers)))
    ]
    stale = set(args.out.glob("*/*_nohash_*.wav")) - {job[2] for job in jobs}
    if stale:
        logger.warning("%s already holds %d other clips, left as they are", args.out, len(stale))
    logger.info(
        "Writing %d clips (%d words x %d speakers) to %s with %d workers",
        len(jobs), len(words), len(speakers), args.out, args.jobs,
    )
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            chunksize = max(1, len(jobs) // (args.jobs * 8))
            results = pool.map(_make_clip_job, jobs, chunksize=chunksize)
            word_seconds = list(tqdm(results, total=len(jobs), unit="clip", disable=None))
    else:
        word_seconds = [_make_clip_job(job) for job in tqdm(jobs, unit="clip", disable=None)]
    too_long = sum(seconds > CLIP_SAMPLES / SAMPLE_RATE for seconds in word_seconds)
    logger.info(
        "Spoken words last %.2f-%.2f s (mean %.2f s); %d longer than 1 s were cut",
        min(word_seconds), max(word_seconds), np.mean(word_seconds), too_long,
    )
    if args.noise_seconds > 0:
        write_background_noise(args.out / BACKGROUND_NOISE_DIR, args.noise_seconds, args.seed, SAMPLE_RATE)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/make_demo_data.py", *given])
    write_readme(
        args.out, command, args.words, args.unknown_words, speakers, args.noise_seconds,
        espeak_version(), near, args.near_miss_speakers,
    )
    logger.info("Done in %.1f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
