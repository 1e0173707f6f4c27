"""Operator settings: parsing, refusal of malformed values, and README's table."""

import re
from pathlib import Path

import pytest

from speechclas.limits import SETTINGS, Limits, OperatorSettingError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_suit_the_documented_machine():
    limits = Limits.defaults()
    assert limits.max_audio_bytes == 16 * 2**20
    assert limits.client_max_size() > limits.max_audio_bytes
    assert limits.train_roots == ("data", "models")
    assert limits.allow_private_urls is False and limits.url_trust_env is False


def test_environment_overrides_each_kind():
    limits = Limits.from_env({
        "SPEECHCLAS_MAX_AUDIO_BYTES": "1024",
        "SPEECHCLAS_URL_DEADLINE_S": "2.5",
        "SPEECHCLAS_ALLOW_PRIVATE_URLS": "yes",
        "SPEECHCLAS_TRAIN_ROOTS": "/srv/a:/srv/b",
        "SPEECHCLAS_RUN": "api",
        "SPEECHCLAS_MAX_CHANNELS": "  ",  # blank means the default
    })
    assert limits.max_audio_bytes == 1024
    assert limits.url_deadline_s == 2.5
    assert limits.allow_private_urls is True
    assert limits.train_roots == ("/srv/a", "/srv/b")
    assert limits.run == "api"
    assert limits.max_channels == Limits.defaults().max_channels


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SPEECHCLAS_MAX_AUDIO_BYTES", "16M", "whole number"),
        ("SPEECHCLAS_MAX_AUDIO_BYTES", "0", "at least 1"),
        ("SPEECHCLAS_URL_DEADLINE_S", "soon", "a number"),
        ("SPEECHCLAS_ALLOW_PRIVATE_URLS", "maybe", "true or false"),
        ("SPEECHCLAS_MAX_AUDIO_SECONDS", "nan", "at least"),
    ],
)
def test_malformed_values_are_refused_naming_the_variable(name, value, expected):
    with pytest.raises(OperatorSettingError, match=rf"{name}.*{expected}|{name} must be {expected}"):
        Limits.from_env({name: value})


def test_train_roots_resolve_against_the_project(tmp_path):
    roots = Limits.defaults().train_root_paths(tmp_path)
    assert roots == ((tmp_path / "data").resolve(), (tmp_path / "models").resolve())


def test_every_setting_is_a_limits_field_and_documented_in_readme():
    fields = set(Limits.__dataclass_fields__)
    assert {setting.field for setting in SETTINGS} == fields
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(SPEECHCLAS_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    missing = sorted({setting.env for setting in SETTINGS} - documented)
    assert not missing, f"README's operator table lacks {missing}: run python scripts/config_table.py"
