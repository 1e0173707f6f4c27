"""Words a keyword spotter must refuse, found by sound: the material of `unknown_words`.

A model learns what a keyword is not only from the other words it hears. The
20 other speech_commands words teach little about "cup" for "up" or "shop"
for "stop", so `unknown_words=lexicon` has the synthesis engines say, for the
training split only:

- near-misses of each wanted word: words one or two phoneme edits away, and
  words that hold the keyword's sounds at their start or end ("upper", "setup");
- parts of the longer keywords: words whose sounds begin or end them;
- other common words, and two-word phrases of them.

Sounds are espeak-ng's phonemes, shipped with the word list
(speechclas/lexicon.tsv, made by scripts/make_lexicon.py), so a homophone of
a keyword ("know" for "no", "write" for "right") is never taught as unknown.
A keyword missing from the list is looked up with espeak-ng when it is
installed; without it, letters stand in for sounds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

LEXICON_FILE = Path(__file__).with_name("lexicon.tsv")
LEXICON_ITEM = "lexicon"  # the unknown_words item that stands for the shipped list
NEAR_MISSES_PER_WORD = 10
COPIES = 3  # clips of each near-miss, part or own word (said by different speakers)
FOCUSED_SHARE = 0.5  # at most this share of the clips go to near-misses, parts and own words
PHRASE_SHARE = 1 / 3  # of the remaining clips, two-word phrases; the rest single words
_STRESS = re.compile(r"[',]")


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """Words in a fixed order and the phoneme string of each."""

    words: tuple[str, ...]
    phonemes: Mapping[str, str]


@functools.cache
def load_lexicon(path: Path = LEXICON_FILE) -> Lexicon:
    """The shipped word list (read once per process; it is never modified)."""
    words, phonemes = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        word, _, sounds = line.partition("\t")
        words.append(word)
        phonemes[word] = sounds
    return Lexicon(words=tuple(words), phonemes=phonemes)


def sounds(phonemes: str) -> str:
    """A phoneme string without stress marks, compared character by character."""
    return _STRESS.sub("", phonemes)


def espeak_phonemes(texts: Sequence[str]) -> dict[str, str]:
    """espeak-ng's phonemes of each text (empty when espeak-ng is not installed)."""
    if not texts or shutil.which("espeak-ng") is None:
        return {}
    try:
        result = subprocess.run(["espeak-ng", "-q", "-x", "-v", "en-us", "--stdin"],
                                input="".join(f"{text}.\n" for text in texts), capture_output=True, text=True,
                                check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("espeak-ng could not give the phonemes of %s: %s", ", ".join(texts), exc)
        return {}
    lines = [line.strip() for line in result.stdout.splitlines()]
    return dict(zip(texts, lines, strict=True)) if len(lines) == len(texts) else {}


def edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance of `a` and `b`, or `limit + 1` once it is certain to exceed `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        if min(current) > limit:
            return limit + 1
        previous = current
    return previous[-1]


def keyword_sounds(words: Sequence[str], lexicon: Lexicon) -> dict[str, str]:
    """The sounds of each wanted word: from the lexicon, else espeak-ng, else its letters."""
    known = {word: lexicon.phonemes[word.lower()] for word in words if word.lower() in lexicon.phonemes}
    missing = [word for word in words if word not in known]
    known.update(espeak_phonemes(missing))
    for word in words:
        if word not in known:
            logger.info("unknown_words: no phonemes for %r (espeak-ng not installed); comparing letters", word)
    return {word: sounds(known[word]) if word in known else word.lower() for word in words}


def _word_sounds(word: str, lexicon: Lexicon, letters: bool) -> str:
    return word if letters else sounds(lexicon.phonemes[word])


def near_misses(keyword: str, key_sounds: str, lexicon: Lexicon, excluded: set[str], letters: bool = False,
                limit: int = NEAR_MISSES_PER_WORD) -> list[str]:
    """Words that sound almost like `keyword`: one edit away first, then two (for longer
    keywords), then those that start or end with its sounds; never one that sounds the same."""
    short = len(key_sounds) <= 3
    scored = []
    for word in lexicon.words:
        if word in excluded:
            continue
        heard = _word_sounds(word, lexicon, letters)
        if heard == key_sounds:
            continue  # a homophone: the same sounds, it must not be taught as unknown
        distance = edit_distance(heard, key_sounds, 1 if short else 2)
        if distance <= (1 if short else 2):
            scored.append((distance, abs(len(heard) - len(key_sounds)), word))
        elif len(heard) > len(key_sounds) and (heard.startswith(key_sounds) or heard.endswith(key_sounds)):
            scored.append((3, len(heard) - len(key_sounds), word))
    return [word for *_, word in sorted(scored)[:limit]]


def keyword_parts(keyword: str, key_sounds: str, lexicon: Lexicon, excluded: set[str], letters: bool = False,
                  limit: int = NEAR_MISSES_PER_WORD) -> list[str]:
    """For keywords of two or more words, each word; for longer ones, words whose sounds start or
    end the keyword's (at least 2 sounds, at most all but one)."""
    parts = [word for word in keyword.lower().replace("-", " ").split() if word != keyword.lower()]
    if len(key_sounds) >= 5:
        for word in lexicon.words:
            heard = _word_sounds(word, lexicon, letters)
            if (word not in excluded and 2 <= len(heard) < len(key_sounds)
                    and (key_sounds.startswith(heard) or key_sounds.endswith(heard))):
                parts.append(word)
    return list(dict.fromkeys(part for part in parts if part not in excluded))[:limit]


def _round_robin(groups: Sequence[Sequence[str]], copies: int, count: int) -> list[str]:
    """Each text of each group once, the groups taken in turn, then again up to `copies` times; at most `count`."""
    rounds = []
    for _ in range(copies):
        longest = max((len(group) for group in groups), default=0)
        rounds += [group[i] for i in range(longest) for group in groups if i < len(group)]
    return rounds[:count]


def exclusions(wanted: Sequence[str], lexicon: Lexicon, reserved: Sequence[str] = ()) -> tuple[dict[str, str], set[str]]:
    """The sounds of each wanted word, and the words never to say as unknown: the wanted words,
    their homophones and plurals, and the `reserved` ones."""
    key_sounds = keyword_sounds(wanted, lexicon)
    homophones = {word for word in lexicon.words if sounds(lexicon.phonemes[word]) in set(key_sounds.values())}
    inflected = {f"{word}{end}" for word in wanted for end in ("s", "es")}
    return key_sounds, set(wanted) | homophones | inflected | {word.lower() for word in reserved}


def nearest_in_turn(keywords: Sequence[str], count: int, reserved: Sequence[str] = (),
                    lexicon: Lexicon | None = None) -> list[str]:
    """`count` near-misses, the nearest of each keyword in turn, then the second nearest, and so on."""
    lexicon = lexicon or load_lexicon()
    wanted = [word.lower() for word in keywords]
    key_sounds, excluded = exclusions(wanted, lexicon, reserved)
    lists = [near_misses(word, key_sounds[word], lexicon, excluded) for word in wanted]
    return list(dict.fromkeys(_round_robin(lists, 1, len(wanted) * NEAR_MISSES_PER_WORD)))[:max(0, count)]


def unknown_texts(wanted_words: Sequence[str], items: Sequence[str], count: int, seed: int,
                  lexicon: Lexicon | None = None, reserved: Sequence[str] = ()) -> list[str]:
    """`count` texts to say as `_unknown_` (a text may come more than once, for different speakers).

    `items` are unknown_words: `lexicon` (the shipped list) and the user's own
    words or phrases. The user's words, the near-misses and the parts come
    first, up to half the clips, each up to COPIES times; with `lexicon` the
    rest are other words of the list and two-word phrases of them, drawn from
    `seed`. `reserved` words (the data's own folders, other texts) are never
    drawn, and no text sounds like a wanted word.
    """
    lexicon = lexicon or load_lexicon()
    wanted = [word.lower() for word in wanted_words]
    key_sounds, excluded = exclusions(wanted, lexicon, reserved)
    own = [item for item in dict.fromkeys(items) if item != LEXICON_ITEM and item.lower() not in excluded]
    groups = [own]
    if LEXICON_ITEM in items:
        for word in wanted:
            letters = word not in lexicon.phonemes and word == key_sounds[word]
            groups.append(near_misses(word, key_sounds[word], lexicon, excluded, letters))
            groups.append(keyword_parts(word, key_sounds[word], lexicon, excluded, letters))
    seen: set[str] = set()
    for group in groups:  # a near-miss of two keywords (bow: no, go) is said in one group only
        group[:] = [text for text in group if text not in seen]
        seen.update(group)
    focused_limit = count if LEXICON_ITEM not in items else int(count * FOCUSED_SHARE)
    focused = _round_robin(groups, COPIES if LEXICON_ITEM in items else max(1, -(-count // max(1, len(own)))),
                           focused_limit)
    if LEXICON_ITEM not in items:
        return focused
    rng = random.Random(seed)
    used = excluded | set(focused)
    pool = [word for word in lexicon.words if word not in used]
    rest = count - len(focused)
    phrases = int(rest * PHRASE_SHARE)
    singles = rng.sample(pool, min(len(pool), rest - phrases))
    pairs = [f"{rng.choice(pool)} {rng.choice(pool)}" for _ in range(phrases)]
    texts = focused + singles + pairs
    logger.info("unknown_words: %d clips: %d of near-misses, parts and own words, %d other words, %d phrases",
                len(texts), len(focused), len(singles), len(pairs))
    return texts


def folder_name(text: str) -> str:
    """A data folder name for a text (phrases joined by '-'), never a reserved or hidden one."""
    name = re.sub(r"[^\w'-]+", "-", text.strip().lower()).strip("-_.")
    return name or "unknown"
