"""etc/config.yaml, the typed Config and the validation of every parameter.

Each kind of bad value must be refused with a message that names the
parameter, before any work starts.
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from speechclas.config import (
    GROUPS,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    load_param_specs,
    parse_cli_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_YAML = ROOT / "etc" / "config.yaml"


@pytest.fixture(scope="module")
def specs():
    return load_param_specs(CONFIG_YAML)


@pytest.fixture(scope="module")
def raw_yaml():
    return yaml.safe_load(CONFIG_YAML.read_text())


def yaml_defaults(raw):
    """{name: value} straight from the YAML file."""
    return {name: entry["value"] for group in raw.values() for name, entry in group.items()}


def test_defaults_load_and_equal_the_yaml(raw_yaml):
    config = load_config(path=CONFIG_YAML)
    expected = yaml_defaults(raw_yaml)
    for name, value in expected.items():
        if isinstance(value, list):
            value = tuple(value)
        assert getattr(config, name) == value, name
    # The recipe's defaults, which the YAML must keep.
    assert (config.sample_rate, config.clip_duration_ms, config.feature_bin_count) == (16000, 1000, 40)
    assert (config.window_size_ms, config.window_stride_ms) == (30.0, 10.0)
    assert config.wanted_words == ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
    assert config.batch_size == 100


def test_default_values_have_their_declared_python_types(specs):
    config = load_config(specs=specs)
    python_type = {"str": str, "int": int, "float": float, "bool": bool}
    for name, spec in specs.items():
        value = getattr(config, name)
        if spec.type.startswith("list["):
            assert isinstance(value, tuple), name
            kind = python_type[spec.type[5:-1]]
            assert all(type(item) is kind for item in value), name
        else:
            assert type(value) is python_type[spec.type], name


def test_yaml_keys_are_the_config_fields_in_their_groups(raw_yaml):
    assert tuple(raw_yaml) == GROUPS
    in_yaml = {name: group for group, entries in raw_yaml.items() for name in entries}
    in_dataclass = {f.name: f.metadata["group"] for f in dataclasses.fields(Config)}
    assert in_yaml == in_dataclass


def test_every_parameter_has_help(specs):
    assert all(spec.help for spec in specs.values()), [n for n, s in specs.items() if not s.help]


@pytest.mark.parametrize(
    "overrides, name, reason",
    [
        ({"batch_size": "abc"}, "batch_size", "integer"),
        ({"batch_size": 12.5}, "batch_size", "integer"),
        ({"sample_rate": True}, "sample_rate", "integer"),
        ({"check_nans": "maybe"}, "check_nans", "true or false"),
        ({"background_volume": "loud"}, "background_volume", "number"),
        ({"data_url": 5}, "data_url", "string"),
        ({"how_many_training_steps": "1000,abc"}, "how_many_training_steps", "integer"),
        ({"how_many_training_steps": 7}, "how_many_training_steps", "list"),
        ({"wanted_words": ""}, "wanted_words", "empty"),
    ],
)
def test_wrong_type_is_refused_naming_the_parameter(specs, overrides, name, reason):
    with pytest.raises(ConfigError, match=reason) as caught:
        load_config(overrides, specs=specs)
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "5000"}, "batch_size"),
        ({"background_volume": 2}, "background_volume"),
        ({"dropout_rate": -0.1}, "dropout_rate"),
        ({"silence_percentage": float("nan")}, "silence_percentage"),
        ({"how_many_training_steps": "1000,0"}, "how_many_training_steps"),
        ({"learning_rate": [0.001, 100]}, "learning_rate"),
    ],
)
def test_out_of_range_is_refused_naming_the_parameter(specs, overrides, name):
    with pytest.raises(ConfigError, match="must be between") as caught:
        load_config(overrides, specs=specs)
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"model_architecture": "resnet"}, "model_architecture"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"preprocess": "mel"}, "preprocess"),
    ],
)
def test_value_not_among_choices_is_refused_naming_the_parameter(specs, overrides, name):
    with pytest.raises(ConfigError, match="must be one of") as caught:
        load_config(overrides, specs=specs)
    message = str(caught.value)
    assert repr(name) in message
    assert all(choice in message for choice in specs[name].choices)


def test_unknown_parameter_is_refused_by_name(specs):
    with pytest.raises(ConfigError, match="unknown parameter 'batch_sizes'"):
        load_config({"batch_sizes": 10}, specs=specs)


def test_stages_of_steps_and_rates_must_have_equal_lengths(specs):
    overrides = {"how_many_training_steps": "1000,300,100", "learning_rate": "0.001,0.0001"}
    with pytest.raises(ConfigError, match="same number of stages") as caught:
        load_config(overrides, specs=specs)
    assert "'how_many_training_steps'" in str(caught.value)
    assert "'learning_rate'" in str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"window_size_ms": 200.0, "clip_duration_ms": 100}, "'window_size_ms'"),
        ({"validation_percentage": 50, "testing_percentage": 50}, "'validation_percentage'"),
        ({"wanted_words": "yes,no,yes"}, "'wanted_words'"),
        ({"wanted_words": "yes,_silence_"}, "'wanted_words'"),
    ],
)
def test_inconsistent_parameters_are_refused(specs, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides, specs=specs)


def test_strings_from_the_cli_or_a_form_are_parsed(specs):
    config = load_config(
        {
            "how_many_training_steps": "1000,300",
            "learning_rate": "0.01, 0.001",
            "wanted_words": "yes, no ,up",
            "batch_size": "32",
            "check_nans": "yes",
            "background_volume": "0.25",
        },
        specs=specs,
    )
    assert config.how_many_training_steps == (1000, 300)
    assert config.learning_rate == (0.01, 0.001)
    assert config.wanted_words == ("yes", "no", "up")
    assert config.batch_size == 32
    assert config.check_nans is True
    assert config.background_volume == 0.25


def test_yaml_with_a_duplicated_key_is_refused(tmp_path):
    text = CONFIG_YAML.read_text()
    assert "  clip_duration_ms:\n" in text
    doubled = text.replace(
        "  clip_duration_ms:\n", "  sample_rate:\n    value: 8000\n    type: int\n  clip_duration_ms:\n", 1
    )
    path = tmp_path / "config.yaml"
    path.write_text(doubled)
    with pytest.raises(ConfigError, match="'sample_rate' is written twice"):
        load_param_specs(path)


def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_yaml_missing_a_parameter_is_refused(tmp_path, raw_yaml):
    raw = json.loads(json.dumps(raw_yaml))
    del raw["model_settings"]["dropout_rate"]
    path = write_yaml(tmp_path / "config.yaml", raw)
    with pytest.raises(ConfigError, match="lacks parameters.*dropout_rate"):
        load_param_specs(path)


def test_yaml_rewritten_unchanged_still_loads(tmp_path, raw_yaml):
    """Control for the tests that edit a copy of the file."""
    path = write_yaml(tmp_path / "config.yaml", raw_yaml)
    assert load_config(path=path) == load_config(path=CONFIG_YAML)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["general"].update(colour={"value": "red", "type": "str"}), "unknown parameter 'colour'"),
        (lambda raw: raw["general"].update(sample_rate=raw["model_settings"].pop("sample_rate")),
         "'sample_rate' belongs in group model_settings"),
        (lambda raw: raw["training_parameters"]["batch_size"].update(value=0), "'batch_size' must be between"),
        (lambda raw: raw["training_parameters"]["batch_size"].update(type="integer"), "'batch_size' has unknown type"),
    ],
)
def test_yaml_with_a_bad_entry_is_refused(tmp_path, raw_yaml, edit, message):
    raw = json.loads(json.dumps(raw_yaml))
    edit(raw)
    path = write_yaml(tmp_path / "config.yaml", raw)
    with pytest.raises(ConfigError, match=message):
        load_param_specs(path)


def test_to_dict_round_trips_through_config_from_dict(specs):
    config = load_config(
        {"batch_size": 32, "wanted_words": "yes,no", "learning_rate": "0.01,0.002", "check_nans": True},
        specs=specs,
    )
    stored = json.loads(config.to_json())
    assert set(stored) == set(GROUPS)
    assert stored["audio_processor"]["wanted_words"] == ["yes", "no"]
    assert config_from_dict(stored, specs) == config
    flat = {name: value for group in stored.values() for name, value in group.items()}
    assert config_from_dict(flat, specs) == config


def test_parse_cli_overrides():
    assert parse_cli_overrides(["batch_size=32", "wanted_words=yes,no", "data_url=http://h/a.tgz?x=1"]) == {
        "batch_size": "32",
        "wanted_words": "yes,no",
        "data_url": "http://h/a.tgz?x=1",
    }
    with pytest.raises(ConfigError, match="'novalue'"):
        parse_cli_overrides(["batch_size=32", "novalue"])


def _value_texts(value):
    """Ways a default may be written in the README: as in Python, or floats in %g."""
    def plain(item):
        return str(item).lower()

    def short(item):
        return f"{item:g}" if isinstance(item, float) else plain(item)

    items = value if isinstance(value, list) else [value]
    return {",".join(map(plain, items)), ",".join(map(short, items))}


def _normalise(text):
    return re.sub(r"[\s`\"'\[\]()]", "", text).lower()


def test_readme_config_table_matches_config_yaml(raw_yaml):
    """README.md has one table row per parameter, `| `name` | ...`, with its default."""
    readme = (ROOT / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        found = re.match(r"\|\s*`([a-z_]+)`\s*\|", line.strip())
        if found:
            rows[found.group(1)] = line
    defaults = yaml_defaults(raw_yaml)
    missing = sorted(set(defaults) - set(rows))
    assert not missing, f"README.md config table lacks rows for {missing}"
    wrong = []
    for name, value in defaults.items():
        if value == "":
            continue  # an empty default may be written many ways
        texts = {_normalise(text) for text in _value_texts(value)}
        row = _normalise(rows[name])
        if not any(re.search(rf"(?<![\w.-]){re.escape(text)}(?![\w.])", row) for text in texts):
            wrong.append(f"{name} (default {value!r})")
    assert not wrong, f"README.md config table shows wrong defaults for {wrong}"
