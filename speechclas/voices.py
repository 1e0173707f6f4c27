"""Words said by other speech synthesis engines, for training and for the data scripts.

A model trained on one synthesiser's voices learns that synthesiser, not the
words: trained on espeak-ng alone, tc_resnet8 reaches about 0.6 balanced accuracy
on flite's and festival's voices; with speakers of one of those engines added
to its training data it reaches 0.81 on the other (README, "Time to accuracy"). The
`synthetic_voices` training parameter therefore adds clips of every word of
the training split, said by speakers of the engines installed on the server
(espeak-ng, flite, festival), to the training clips only: validation and
test stay the user's own data. The same speakers say `unknown_words`
(speechclas.lexicon) and, for a training from text alone, every word.

A speaker is a voice of an engine with a duration stretch, a pitch factor and
a level; a clip is post-processed as scripts/make_demo_data.py's clips are
(trimmed, levelled, placed in the clip over a faint noise floor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

LEVEL_DB_RANGE = (-15.0, -3.0)  # peak level of a speaker's words, dBFS
CLIP_GAIN_DB_RANGE = (-4.0, 2.0)  # per-clip gain on top of the speaker level
NOISE_DB_RANGE = (-65.0, -50.0)  # RMS of the noise floor under each clip, dBFS
STRETCH_RANGE = (0.8, 1.25)  # duration stretch, >1 is slower
PITCH_FACTOR_RANGE = (0.8, 1.25)  # f0 times the voice's own

# espeak-ng's English accents and the voice variants that still sound like speech (left out:
# robotic and effect voices, ed, iven and paul, whose output clips, klatt6 and caleb, which sound
# exactly like klatt). scripts/make_demo_data.py draws the demo's speakers from them.
ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-us-nyc")
ESPEAK_KLATT_VARIANTS = ("klatt", "klatt2", "klatt3", "klatt4", "klatt5")
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", *ESPEAK_KLATT_VARIANTS,
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "anika", "aunty", "belinda",
    "benjamin", "croak", "david", "Denis", "edward", "grandma", "grandpa",
    "john", "Lee", "linda", "max", "Michael", "Mike", "norbert", "quincy", "rob",
    "robert", "shelby", "steph", "travis", "victor", "whisper", "whisperf", "zac",
)  # fmt: skip
ESPEAK_SPEED = 175  # espeak-ng's own words per minute, divided by a speaker's stretch
# espeak-ng's -p (0-99, its own 50) moves f0 by about 0.8 Hz a step around its 90 Hz: a pitch
# factor k is -p 50 + 110 (k - 1) (measured: 0.8 and 1.25 give f0 72 and 114 Hz, the 1.56 asked).
ESPEAK_PITCH = 50
ESPEAK_PITCH_STEPS = 110
# Each engine's English voices, with whether its pitch can be set. espeak-ng's synthetic speakers
# leave out the klatt variants, so the benchmark's klatt family stays a kind of voice never heard. flite's
# awb_time only speaks times of day, so it is left out; rms ignores f0_shift.
# Festival's diphone voices take a target f0 mean (105 Hz is their own); the
# HTS voice takes a speed (hts_engine's -r) but no pitch.
ENGINE_VOICES: Mapping[str, Mapping[str, bool]] = {
    "espeak-ng": {f"{accent}+{variant}": True for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS
                  if variant not in ESPEAK_KLATT_VARIANTS},
    "flite": {"kal": True, "kal16": True, "awb": True, "slt": True, "rms": False},
    "festival": {"kal_diphone": True, "ked_diphone": True, "cmu_us_slt_arctic_hts": False},
}
FESTIVAL_F0_MEAN = 105
# The program each engine runs and the Debian packages that install it with its voices.
ENGINE_PROGRAMS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "espeak-ng": ("espeak-ng", ("espeak-ng",)),
    "flite": ("flite", ("flite",)),
    "festival": ("text2wave", ("festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts")),
}
INSTALLER = "scripts/install_voices.sh"
# A folder name is said only when it reads as a word (letters, inner ' or -).
_SAYABLE = re.compile(r"^[^\W\d_]+(?:['-][^\W\d_]+)*$")


class VoicesError(RuntimeError):
    """An engine asked for cannot run here."""


@dataclasses.dataclass(frozen=True)
class EngineSpeaker:
    """One speaker of a synthesis engine: a voice, a duration stretch, a pitch
    factor (1 where the voice's pitch cannot be set) and a peak level."""

    engine: str
    voice: str
    stretch: float
    pitch: float
    level_db: float

    @property
    def id(self) -> str:
        key = f"{self.engine}:{self.voice}|d{self.stretch:.2f}|f{self.pitch:.2f}|l{self.level_db:.1f}"
        return hashlib.sha1(key.encode()).hexdigest()[:8]


def choose_engine_speakers(engine: str, count: int, seed: int) -> list[EngineSpeaker]:
    """`count` distinct speakers drawn from `seed`, the voices taken round-robin in a seeded order."""
    voices = ENGINE_VOICES[engine]
    rng = random.Random(seed)
    names = sorted(voices)
    rng.shuffle(names)
    speakers, ids = [], set()
    while len(speakers) < count:
        voice = names[len(speakers) % len(names)]
        speaker = EngineSpeaker(
            engine=engine,
            voice=voice,
            stretch=round(rng.uniform(*STRETCH_RANGE), 2),
            pitch=round(rng.uniform(*PITCH_FACTOR_RANGE), 2) if voices[voice] else 1.0,
            level_db=round(rng.uniform(*LEVEL_DB_RANGE), 1),
        )
        if speaker.id not in ids:
            ids.add(speaker.id)
            speakers.append(speaker)
    return speakers


def engine_command(text_file: Path, speaker: EngineSpeaker, out: Path) -> list[str]:
    """The command that says the text of `text_file` as `speaker` into the wav file `out`."""
    if speaker.engine == "espeak-ng":
        pitch = min(99, max(0, round(ESPEAK_PITCH + ESPEAK_PITCH_STEPS * (speaker.pitch - 1))))
        return ["espeak-ng", "-v", speaker.voice, "-s", str(round(ESPEAK_SPEED / speaker.stretch)), "-p", str(pitch),
                "-f", str(text_file), "-w", str(out)]
    if speaker.engine == "flite":
        return ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={speaker.stretch:g}",
                "--setf", f"f0_shift={speaker.pitch:g}", "-f", str(text_file), "-o", str(out)]
    if speaker.engine == "festival":
        settings = [f"(voice_{speaker.voice})"]
        if ENGINE_VOICES["festival"][speaker.voice]:  # diphone voices: duration stretch and target f0
            settings += [f"(Parameter.set 'Duration_Stretch {speaker.stretch:g})",
                         f"(set! int_lr_params (cons (list 'target_f0_mean {round(FESTIVAL_F0_MEAN * speaker.pitch)}) "
                         "int_lr_params))"]
        else:  # HTS voices ignore Duration_Stretch; hts_engine's -r is a speed (1/stretch)
            settings.append(f'(set! hts_engine_params (append hts_engine_params (list (list "-r" '
                            f"{1 / speaker.stretch:.4f}))))")
        return ["text2wave", *(arg for setting in settings for arg in ("-eval", setting)), "-o", str(out),
                str(text_file)]
    raise ValueError(f"unknown engine {speaker.engine!r}")


def synthesize_with_engine(text: str, speaker: EngineSpeaker) -> tuple[np.ndarray, int]:
    """Say `text` as `speaker`; float32 samples (first channel) and the engine's sample rate.

    The text goes through a file, never a command line or a shell.
    """
    with tempfile.TemporaryDirectory() as scratch:
        text_file, wav = Path(scratch) / "text.txt", Path(scratch) / "speech.wav"
        text_file.write_text(text + "\n", encoding="utf-8")
        subprocess.run(engine_command(text_file, speaker, wav), check=True, capture_output=True, timeout=60)
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    if audio.size == 0 or not audio.any():
        raise RuntimeError(f"{speaker.engine} produced no audio for {text!r} with {speaker}")
    return audio[:, 0].copy(), rate


def missing_engines(engines: Sequence[str]) -> list[str]:
    """Engines whose program is not on PATH."""
    return [engine for engine in engines if shutil.which(ENGINE_PROGRAMS[engine][0]) is None]


def check_engines(engines: Sequence[str]) -> None:
    """Raise VoicesError naming the program and the installer when an engine cannot run."""
    unknown = [engine for engine in engines if engine not in ENGINE_PROGRAMS]
    if unknown:
        raise VoicesError(f"unknown synthesis engine(s) {', '.join(unknown)}; known: {', '.join(ENGINE_PROGRAMS)}")
    missing = missing_engines(engines)
    if missing:
        needs = "; ".join(f"{engine} runs {ENGINE_PROGRAMS[engine][0]} (Debian packages "
                          f"{' '.join(ENGINE_PROGRAMS[engine][1])})" for engine in missing)
        raise VoicesError(f"synthetic_voices needs {needs}, not found on this machine; install them with "
                          f"`bash {INSTALLER}` or leave synthetic_voices empty")


# --- post-processing --------------------------------------------------------------------------


def trim_silence(audio: np.ndarray, sample_rate: int, threshold_db: float = -40.0, frame_ms: int = 10) -> np.ndarray:
    """Cut leading and trailing frames quieter than `threshold_db` below the peak.

    Synthesisers pad their output with silence of varying length; without
    trimming, the random placement inside the clip would be biased by it.
    """
    frame = max(1, sample_rate * frame_ms // 1000)
    frames = len(audio) // frame
    if frames == 0:
        return audio
    rms = np.sqrt(np.mean(audio[: frames * frame].reshape(frames, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms > np.max(rms) * 10 ** (threshold_db / 20))
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def trim_to_word(audio: np.ndarray, clip_samples: int, rng: random.Random, sample_rate: int,
                 lead_ms: tuple[int, int] = (0, 150), tail_ms: int = 30) -> np.ndarray:
    """Keep the word with a random lead-in and a short tail, at most one clip long.

    speech_commands itself holds clips shorter than 1 s (the loader pads
    them); storing only the word keeps the shipped demo small.
    """
    lead = np.zeros(rng.randint(*lead_ms) * sample_rate // 1000, dtype=np.float32)
    tail = np.zeros(tail_ms * sample_rate // 1000, dtype=np.float32)
    return np.concatenate([lead, audio, tail])[:clip_samples]


def place_in_clip(audio: np.ndarray, clip_samples: int, rng: random.Random, margin: int = 800) -> np.ndarray:
    """Put `audio` at a random offset in a zero clip; longer audio keeps its start.

    Up to `margin` samples (50 ms at 16 kHz) stay free at both ends when the
    word is short enough, so time-shift augmentation does not cut it at once.
    """
    clip = np.zeros(clip_samples, dtype=np.float32)
    audio = audio[:clip_samples]
    margin = min(margin, (clip_samples - len(audio)) // 2)
    offset = rng.randint(margin, clip_samples - len(audio) - margin)
    clip[offset : offset + len(audio)] = audio
    return clip


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


def shape_clip(audio: np.ndarray, rate: int, level_db: float, rng: random.Random, sample_rate: int,
               clip_samples: int, full_clip: bool) -> tuple[np.ndarray, float]:
    """A synthesiser's output as a clip: resampled, trimmed, levelled, placed, over a noise floor.

    `full_clip` places the word at a random offset in `clip_samples`; otherwise
    only the word is kept (with a random lead-in). Answers the clip and the
    length of the spoken word in seconds (before any cut).
    """
    audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    audio = trim_silence(audio, sample_rate)
    word_seconds = len(audio) / sample_rate
    peak_db = level_db + rng.uniform(*CLIP_GAIN_DB_RANGE)
    audio *= 10 ** (min(peak_db, -1.0) / 20) / np.max(np.abs(audio))
    if full_clip:
        clip = place_in_clip(audio, clip_samples, rng)
    else:
        clip = trim_to_word(audio, clip_samples, rng, sample_rate)
    noise_rms = 10 ** (rng.uniform(*NOISE_DB_RANGE) / 20)
    noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(len(clip))
    clip += (noise * noise_rms).astype(np.float32)
    return clip, word_seconds


# --- training clips ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticClips:
    """Clips said by other engines: int16 audio [clips, samples] (as data.load_clips
    gives), the word (or text) and speaker of each, and what could not be said (word, speaker id, reason)."""

    audio: np.ndarray
    words: tuple[str, ...]
    failures: tuple[tuple[str, str, str], ...]
    speakers: tuple[str, ...] = ()  # the speaker id of each clip


def sayable_words(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """The folder names an engine can say as words, and the others."""
    said = [word for word in words if _SAYABLE.match(word)]
    return said, [word for word in words if not _SAYABLE.match(word)]


def engine_speakers(engines: Sequence[str], per_engine: int, seed: int) -> list[EngineSpeaker]:
    """`per_engine` speakers of each engine, drawn from `seed` (the same speakers for the same arguments)."""
    return [speaker for number, engine in enumerate(engines)
            for speaker in choose_engine_speakers(engine, per_engine, seed * 1000 + number)]


def speaker_tasks(texts: Sequence[str], speakers: Sequence[EngineSpeaker], seed: int) -> list[tuple[str, EngineSpeaker]]:
    """Each text said by one speaker, the speakers taken in turn in a seeded order, so a text that
    comes several times is said by different speakers and every engine says its share."""
    order = list(speakers)
    random.Random(f"{seed}:unknown").shuffle(order)
    return [(text, order[number % len(order)]) for number, text in enumerate(texts)] if order else []


def synthesize_clips(
    words: Sequence[str], engines: Sequence[str], speakers_per_engine: int, seed: int, sample_rate: int,
    clip_samples: int, jobs: int, synthesize: Callable[[str, EngineSpeaker], tuple[np.ndarray, int]] | None = None,
    unknown: Sequence[str] = (),
) -> SyntheticClips:
    """Every word said once by each of `speakers_per_engine` speakers of each engine, and each
    text of `unknown` (speechclas.lexicon.unknown_texts) once by one of those speakers.

    Speakers and each clip's placement are drawn from `seed`, so a training
    with the same parameters gets the same clips. A clip an engine fails on is
    left out and reported, not fatal. `jobs` engine processes run at once.
    """
    check_engines(engines)
    said, unsaid = sayable_words(words)
    if unsaid:
        logger.warning("synthetic_voices: not saying %d folder names that are not words: %s",
                       len(unsaid), ", ".join(unsaid[:10]))
    speakers = engine_speakers(engines, speakers_per_engine, seed)
    tasks = [(word, speaker) for speaker in speakers for word in said] + speaker_tasks(unknown, speakers, seed)
    say = synthesize or synthesize_with_engine

    def one(task: tuple[str, EngineSpeaker]) -> np.ndarray | str:
        word, speaker = task
        rng = random.Random(f"{seed}:{speaker.id}:{word}")
        try:
            audio, rate = say(word, speaker)
            return to_pcm16(shape_clip(audio, rate, speaker.level_db, rng, sample_rate, clip_samples, True)[0])
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, tasks))
    kept = [i for i, result in enumerate(results) if not isinstance(result, str)]
    failures = tuple((word, speaker.id, result) for (word, speaker), result in zip(tasks, results, strict=True)
                     if isinstance(result, str))
    for engine in engines:
        made = sum(1 for i in kept if tasks[i][1].engine == engine)
        first = next((reason for (_, speaker), reason in zip(tasks, results, strict=True)
                      if speaker.engine == engine and isinstance(reason, str)), None)
        if not made and first is not None:  # e.g. the program is there but not its voices
            raise VoicesError(f"{engine} could not say any of the {len(said) + len(set(unknown))} words ({first}); install its "
                              f"voices with `bash {INSTALLER}` or leave it out of synthetic_voices")
    for word, speaker_id, reason in failures[:5]:
        logger.warning("synthetic_voices: could not say %r as speaker %s: %s", word, speaker_id, reason)
    audio = np.stack([results[i] for i in kept]) if kept else np.zeros((0, clip_samples), np.int16)
    logger.info("synthetic_voices: %d clips of %d words and %d unknown texts by %d speakers of %s (%d failed)",
                len(kept), len(said), len(unknown), len(speakers), ", ".join(engines), len(failures))
    return SyntheticClips(audio=audio, words=tuple(tasks[i][0] for i in kept), failures=failures,
                          speakers=tuple(tasks[i][1].id for i in kept))
