"""Background noise made with numpy: for the demo data and for trainings that have no recordings.

speech_commands ships real noise recordings; a dataset made by a script, or a
training from text alone (`text_only`), gets white, pink and brown noise and a
running tap instead, each at about -20 dBFS RMS, so silence clips and noise
mixing have something to draw from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from speechclas.voices import to_pcm16

NOISE_KINDS = ("white_noise", "pink_noise", "brown_noise", "running_tap")


def shaped_noise(samples: int, sample_rate: int, rng: np.random.Generator, exponent: float = 0.0,
                 band: tuple[float, float | None] = (20.0, None)) -> np.ndarray:
    """Gaussian noise whose amplitude spectrum falls as 1/f**exponent inside `band`.

    exponent 0 is white, 0.5 pink, 1 brown (red) noise.
    """
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.fft.rfftfreq(samples, 1 / sample_rate)
    low, high = band
    gain = np.maximum(freqs, low) ** -exponent
    gain[freqs < low] = 0.0
    if high is not None:
        gain[freqs > high] = 0.0
    return np.fft.irfft(spectrum * gain, n=samples)


def running_tap(samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Water-like noise: band-limited hiss that swells and ebbs, plus droplet plinks."""
    hiss = shaped_noise(samples, sample_rate, rng, exponent=0.3, band=(300.0, 6000.0))
    hiss /= np.std(hiss)
    swell = shaped_noise(samples, sample_rate, rng, exponent=0.0, band=(0.5, 6.0))
    hiss *= 1.0 + 0.5 * swell / np.max(np.abs(swell))
    drops = np.zeros(samples)
    count = int(25 * samples / sample_rate)
    t = np.arange(int(0.03 * sample_rate)) / sample_rate
    for start, freq in zip(
        rng.integers(0, samples - len(t), count), rng.uniform(400.0, 2500.0, count), strict=True
    ):
        drops[start : start + len(t)] += np.sin(2 * np.pi * freq * t) * np.exp(-t / 0.006)
    return hiss + 3.0 * drops


def make_noise(kind: str, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One long background-noise recording, at about -20 dBFS RMS."""
    samples = int(seconds * sample_rate)
    if kind == "running_tap":
        noise = running_tap(samples, sample_rate, rng)
    else:
        exponent = {"white_noise": 0.0, "pink_noise": 0.5, "brown_noise": 1.0}[kind]
        noise = shaped_noise(samples, sample_rate, rng, exponent=exponent)
    noise *= 0.1 / np.std(noise)
    return noise / max(1.0, np.max(np.abs(noise)) / 0.95)


def write_background_noise(folder: Path, seconds: float, seed: int, sample_rate: int) -> None:
    """Write a `_background_noise_` folder (one file per kind) that silence and noise mixing read from."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, kind in enumerate(NOISE_KINDS):
        rng = np.random.default_rng([seed, index])
        noise = make_noise(kind, seconds, sample_rate, rng)
        sf.write(folder / f"{kind}.wav", to_pcm16(noise), sample_rate, subtype="PCM_16")
