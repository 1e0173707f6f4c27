"""The words to refuse (speechclas.lexicon): found by sound, never a keyword's homophone."""

from __future__ import annotations

import shutil

import pytest

from speechclas import lexicon

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


@pytest.fixture(scope="module")
def lex():
    return lexicon.load_lexicon()


def test_the_shipped_list_has_common_words_with_phonemes(lex):
    assert len(lex.words) > 20_000
    assert {"cup", "shop", "top", "know", "write"} <= set(lex.words)
    assert lex.phonemes["know"] == lex.phonemes["no"], "espeak-ng's sounds: the same for homophones"


def test_near_misses_are_one_sound_away_and_never_sound_the_same(lex):
    sounds = lexicon.keyword_sounds(["up", "stop", "right"], lex)
    up = lexicon.near_misses("up", sounds["up"], lex, {"up"})
    assert {"cup", "pup"} <= set(up)
    stop = lexicon.near_misses("stop", sounds["stop"], lex, {"stop"})
    assert "top" in stop and "stomp" in stop
    right = lexicon.near_misses("right", sounds["right"], lex, {"right"})
    assert "light" in right and "write" not in right and "rite" not in right


def test_parts_of_a_longer_keyword_and_the_words_of_a_phrase(lex):
    sounds = lexicon.keyword_sounds(["marvin", "lights", "turn on"], lex)
    assert "mar" in lexicon.keyword_parts("marvin", sounds["marvin"], lex, {"marvin"})
    assert "light" in lexicon.keyword_parts("lights", sounds["lights"], lex, {"lights"})
    assert set(lexicon.keyword_parts("turn on", sounds["turn on"], lex, set())) >= {"turn", "on"}


def test_unknown_texts_fill_the_count_with_near_misses_first_and_no_keyword_sound(lex):
    texts = lexicon.unknown_texts(KEYWORDS, ["lexicon"], 600, seed=3, reserved=("bed", "cat"))
    assert len(texts) == 600
    assert lexicon.unknown_texts(KEYWORDS, ["lexicon"], 600, seed=3, reserved=("bed", "cat")) == texts
    keyword_sounds = set(lexicon.keyword_sounds(KEYWORDS, lex).values())
    singles = [text for text in texts if " " not in text]
    assert not [text for text in singles if lexicon.sounds(lex.phonemes.get(text, "?")) in keyword_sounds]
    assert not set(texts) & {*KEYWORDS, "know", "write", "bed", "cat", "ups", "stops"}
    focused = texts[: int(600 * lexicon.FOCUSED_SHARE)]
    assert {"cup", "top"} <= set(focused[:100]), "near-misses of every keyword come first"
    assert max(focused.count(text) for text in focused) <= lexicon.COPIES
    assert sum(" " in text for text in texts) >= 90, "two-word phrases"


def test_own_words_are_said_without_the_lexicon(lex):
    texts = lexicon.unknown_texts(["lights"], ["light switch", "fridge", "lights"], 10, seed=0)
    assert set(texts) == {"light switch", "fridge"} and len(texts) == 10


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_a_keyword_outside_the_list_is_looked_up_with_espeak(lex):
    assert "zorbit" not in lex.phonemes
    sounds = lexicon.keyword_sounds(["zorbit"], lex)
    assert sounds["zorbit"] != "zorbit", "espeak-ng's phonemes, not the letters"
    assert lexicon.near_misses("zorbit", sounds["zorbit"], lex, {"zorbit"}), "something sounds near it"


def test_folder_names_of_phrases():
    assert lexicon.folder_name("Light switch!") == "light-switch"
    assert lexicon.folder_name("_x_") == "x"
