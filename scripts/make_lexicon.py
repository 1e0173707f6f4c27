"""Make speechclas/lexicon.tsv: English words with espeak-ng's phonemes, for `unknown_words=lexicon`.

The words are those of 2 to 8 lowercase letters in Debian's wamerican-small
(SCOWL size 35, common English words, a permissive licence whose notice the
file's header carries). Each word's phonemes are espeak-ng's (`-x`, en-us),
so near-misses of a keyword are found by sound, and homophones of a keyword
(know for no, write for right) are never taught as `_unknown_`.

    python scripts/make_lexicon.py              # installs wamerican-small and espeak-ng when missing
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
WORD_LIST = Path("/usr/share/dict/american-english-small")
OUT = ROOT / "speechclas" / "lexicon.tsv"
APT_INSTALL = ROOT / "scripts" / "apt_install.sh"
WORD = re.compile(r"^[a-z]{2,8}$")
HEADER = """\
# speechclas lexicon: English words (2-8 letters) with espeak-ng's phonemes (`espeak-ng -q -x -v en-us`),
# the material of `unknown_words=lexicon` (near-misses of the wanted words, parts of them, other words, phrases).
# Made by scripts/make_lexicon.py from Debian's wamerican-small (SCOWL, size 35):
#   Copyright 2000-2011 by Kevin Atkinson. Permission to use, copy, modify, distribute and sell these word
#   lists, the associated scripts, the output created from the scripts, and its documentation for any purpose
#   is hereby granted without fee, provided that the above copyright notice appears in all copies and that
#   both that copyright notice and this permission notice appear in supporting documentation. Kevin Atkinson
#   makes no representations about the suitability of this array for any purpose. It is provided "as is"
#   without express or implied warranty.
"""


def espeak_phonemes(words: list[str]) -> list[str]:
    """One phoneme string per word: each word a sentence of its own, so espeak-ng answers a line each."""
    text = "".join(f"{word}.\n" for word in words)
    result = subprocess.run(["espeak-ng", "-q", "-x", "-v", "en-us", "--stdin"], input=text, capture_output=True,
                            text=True, check=True)
    lines = [line.strip() for line in result.stdout.splitlines()]
    if len(lines) != len(words):
        raise SystemExit(f"espeak-ng answered {len(lines)} lines for {len(words)} words")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--words", type=Path, default=WORD_LIST)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.words.exists():
        subprocess.run(["bash", str(APT_INSTALL), str(args.words), "wamerican-small"], check=True)
    if shutil.which("espeak-ng") is None:
        subprocess.run(["bash", str(APT_INSTALL), "espeak-ng", "espeak-ng"], check=True)
    words = sorted({line.strip() for line in args.words.read_text().splitlines() if WORD.match(line.strip())})
    phonemes = espeak_phonemes(words)
    rows = "".join(f"{word}\t{sounds}\n" for word, sounds in zip(words, phonemes, strict=True) if sounds)
    args.out.write_text(HEADER + rows)
    logger.info("Wrote %d words to %s", len(words), args.out)


if __name__ == "__main__":
    main()
