"""Typed training settings from ``etc/config.yaml``.

The YAML file is the single description of every parameter (value, type,
help, choices, range). This module reads it when asked (never at import),
applies overrides coming from the CLI or the API, and refuses bad values with
a message that names the parameter, before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

GROUPS = ("general", "model_settings", "audio_processor", "training_parameters", "streaming_evaluation")
TYPES = ("str", "int", "float", "bool", "list[str]", "list[int]", "list[float]")


class ConfigError(ValueError):
    """A configuration value or file a user can fix."""


def project_dir() -> Path:
    """The folder holding etc/, data/ and models/.

    ``SPEECHCLAS_HOME`` wins (a container may mount its data elsewhere);
    otherwise the checkout the package was installed from.
    """
    env = os.environ.get("SPEECHCLAS_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def default_config_path() -> Path:
    return project_dir() / "etc" / "config.yaml"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one parameter is described in config.yaml."""

    name: str
    group: str
    type: str
    default: Any
    help: str
    choices: tuple | None = None
    range: tuple | None = None


def _field(group: str):
    return dataclasses.field(metadata={"group": group})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every training parameter, validated. Field names are the YAML keys."""

    # general
    data_dir: str = _field("general")
    data_url: str = _field("general")
    data_splits_dir: str = _field("general")
    models_dir: str = _field("general")
    # model_settings
    model_architecture: str = _field("model_settings")
    model_width: float = _field("model_settings")
    sample_rate: int = _field("model_settings")
    clip_duration_ms: int = _field("model_settings")
    window_size_ms: float = _field("model_settings")
    window_stride_ms: float = _field("model_settings")
    feature_bin_count: int = _field("model_settings")
    preprocess: str = _field("model_settings")
    feature_normalization: str = _field("model_settings")
    dropout_rate: float = _field("model_settings")
    # audio_processor
    wanted_words: tuple = _field("audio_processor")
    silence_percentage: float = _field("audio_processor")
    unknown_percentage: float = _field("audio_processor")
    time_shift_ms: float = _field("audio_processor")
    background_volume: float = _field("audio_processor")
    background_frequency: float = _field("audio_processor")
    speed_perturbation: float = _field("audio_processor")
    pitch_perturbation: float = _field("audio_processor")
    background_snr_db: tuple = _field("audio_processor")
    gain_db: float = _field("audio_processor")
    spec_time_masks: int = _field("audio_processor")
    spec_time_mask_ms: float = _field("audio_processor")
    spec_freq_masks: int = _field("audio_processor")
    spec_freq_mask_bins: int = _field("audio_processor")
    mixup_alpha: float = _field("audio_processor")
    synthetic_voices: tuple = _field("audio_processor")
    synthetic_speakers: int = _field("audio_processor")
    unknown_words: tuple = _field("audio_processor")
    unknown_word_clips: int = _field("audio_processor")
    text_only: bool = _field("audio_processor")
    validation_percentage: float = _field("audio_processor")
    testing_percentage: float = _field("audio_processor")
    # training_parameters
    how_many_training_steps: tuple = _field("training_parameters")
    learning_rate: tuple = _field("training_parameters")
    learning_rate_schedule: str = _field("training_parameters")
    warmup_steps: int = _field("training_parameters")
    optimizer: str = _field("training_parameters")
    weight_decay: float = _field("training_parameters")
    label_smoothing: float = _field("training_parameters")
    batch_size: int = _field("training_parameters")
    eval_step_interval: int = _field("training_parameters")
    save_step_interval: int = _field("training_parameters")
    start_checkpoint: str = _field("training_parameters")
    check_nans: bool = _field("training_parameters")
    random_seed: int = _field("training_parameters")
    data_loading: str = _field("training_parameters")
    shuffle_buffer: int = _field("training_parameters")
    augment_on: str = _field("training_parameters")
    distribution: str = _field("training_parameters")
    replicas: int = _field("training_parameters")
    collective_timeout_s: float = _field("training_parameters")
    # streaming_evaluation
    streaming_minutes: float = _field("streaming_evaluation")
    streaming_noise_minutes: float = _field("streaming_evaluation")
    babble_clips: int = _field("streaming_evaluation")
    detection_time_tolerance_ms: float = _field("streaming_evaluation")
    target_false_accepts_per_hour: float = _field("streaming_evaluation")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Grouped as in config.yaml, JSON-ready (lists, not tuples)."""
        grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            grouped[field.metadata["group"]][field.name] = (
                list(value) if isinstance(value, tuple) else value
            )
        return grouped

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def path(self, name: str, base_dir: Path | None = None) -> Path:
        """A path parameter, made absolute against the project folder."""
        value = Path(getattr(self, name))
        if value.is_absolute():
            return value
        return (base_dir or project_dir()) / value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"config key {key!r} is written twice (line {key_node.start_mark.line + 1})"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_param_specs(path: Path | str | None = None) -> dict[str, ParamSpec]:
    """Read config.yaml into one spec per parameter, in file order."""
    path = Path(path) if path else default_config_path()
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of groups")
    unknown_groups = set(raw) - set(GROUPS)
    if unknown_groups:
        raise ConfigError(f"unknown config groups {sorted(unknown_groups)}; expected {GROUPS}")
    expected = {f.name: f.metadata["group"] for f in dataclasses.fields(Config)}
    specs: dict[str, ParamSpec] = {}
    for group in GROUPS:
        for name, entry in (raw.get(group) or {}).items():
            if name in specs:
                raise ConfigError(f"parameter {name!r} appears in both {specs[name].group} and {group}")
            if name not in expected:
                raise ConfigError(f"unknown parameter {name!r} in group {group}")
            if expected[name] != group:
                raise ConfigError(f"parameter {name!r} belongs in group {expected[name]}, not {group}")
            specs[name] = _spec_from_entry(name, group, entry)
    missing = set(expected) - set(specs)
    if missing:
        raise ConfigError(f"config file {path} lacks parameters {sorted(missing)}")
    for spec in specs.values():
        # The defaults themselves must pass validation.
        coerce_value(spec, spec.default)
    return specs


def _spec_from_entry(name: str, group: str, entry: Any) -> ParamSpec:
    if not isinstance(entry, dict) or "value" not in entry or "type" not in entry:
        raise ConfigError(f"parameter {name!r} needs at least 'value' and 'type'")
    extra = set(entry) - {"value", "type", "help", "choices", "range"}
    if extra:
        raise ConfigError(f"parameter {name!r} has unknown fields {sorted(extra)}")
    if entry["type"] not in TYPES:
        raise ConfigError(f"parameter {name!r} has unknown type {entry['type']!r}; use one of {TYPES}")
    choices = entry.get("choices")
    value_range = entry.get("range")
    if value_range is not None and (not isinstance(value_range, list) or len(value_range) != 2):
        raise ConfigError(f"parameter {name!r}: range must be [min, max]")
    return ParamSpec(
        name=name,
        group=group,
        type=entry["type"],
        default=entry["value"],
        help=str(entry.get("help", "")).strip(),
        choices=tuple(choices) if choices is not None else None,
        range=tuple(value_range) if value_range is not None else None,
    )


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce_scalar(spec: ParamSpec, kind: str, value: Any):
    label = f"parameter {spec.name!r}"
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a string, got {value!r}")
        return value.strip()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{label} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{label} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{label} must be an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{label} must be a number, got {value!r}")
    raise AssertionError(kind)


def _check_bounds(spec: ParamSpec, value: Any) -> None:
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(
            f"parameter {spec.name!r} must be one of {list(spec.choices)}, got {value!r}"
        )
    if spec.range is not None:
        low, high = spec.range
        if not low <= value <= high:
            raise ConfigError(
                f"parameter {spec.name!r} must be between {low} and {high}, got {value!r}"
            )


LABEL_PUNCTUATION = "_-."


def check_label_names(words: Sequence[str]) -> None:
    """Wanted words name data folders and become the lines of a run's labels.txt,
    so each must be one plain folder name: letters of any script, digits, '_',
    '-' and '.'; not starting with '_' (the reserved _silence_ and _unknown_)
    or '.' (hidden folders are never indexed); each word once."""
    name = "parameter 'wanted_words'"
    for word in words:
        if not word:
            raise ConfigError(f"{name} holds an empty word")
        odd = [char for char in word if unicodedata.category(char)[0] not in "LMN" and char not in LABEL_PUNCTUATION]
        if odd:
            raise ConfigError(
                f"{name}: {word!r} contains {ascii(''.join(dict.fromkeys(odd)))}; a label may hold only "
                f"letters, digits and {' '.join(LABEL_PUNCTUATION)}"
            )
        if word.startswith("_"):
            raise ConfigError(f"{name}: {word!r} starts with '_', kept for the reserved labels _silence_ and _unknown_")
        if word.startswith("."):
            raise ConfigError(f"{name}: {word!r} starts with '.'; folders named so are hidden and never indexed")
    if len(set(words)) != len(words):
        raise ConfigError(f"{name} lists a word twice")


# Rules of one parameter beyond its type, choices and range.
_VALUE_RULES: dict[str, Callable[[Any], None]] = {"wanted_words": check_label_names}
# Lists that may be given empty: no SNR range keeps the recipe's background_volume rule;
# no synthetic voices adds none; no unknown words says none.
_MAY_BE_EMPTY = {"background_snr_db", "synthetic_voices", "unknown_words"}


def coerce_value(spec: ParamSpec, value: Any) -> Any:
    """Convert a raw value (YAML, JSON or a CLI/form string) and validate it.

    Lists may come as lists or as comma-separated strings ("1000,300"); only
    those in _MAY_BE_EMPTY may be empty.
    """
    if spec.type.startswith("list["):
        item_kind = spec.type[5:-1]
        if isinstance(value, str):
            items = [item for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"parameter {spec.name!r} must be a list, got {value!r}")
        if not items and spec.name not in _MAY_BE_EMPTY:
            raise ConfigError(f"parameter {spec.name!r} must not be empty")
        result = tuple(_coerce_scalar(spec, item_kind, item) for item in items)
        for item in result:
            _check_bounds(spec, item)
    else:
        result = _coerce_scalar(spec, spec.type, value)
        _check_bounds(spec, result)
    if spec.name in _VALUE_RULES:
        _VALUE_RULES[spec.name](result)
    return result


def _check_consistency(values: Mapping[str, Any]) -> None:
    """Rules that tie several parameters together."""
    steps, rates = values["how_many_training_steps"], values["learning_rate"]
    if len(steps) != len(rates):
        raise ConfigError(
            "parameters 'how_many_training_steps' and 'learning_rate' must have the same "
            f"number of stages, got {len(steps)} and {len(rates)}"
        )
    if values["weight_decay"] > 0 and values["optimizer"] != "adamw":
        raise ConfigError(
            f"parameter 'weight_decay' is used by optimizer adamw only, got optimizer {values['optimizer']!r}"
        )
    if values["window_size_ms"] > values["clip_duration_ms"]:
        raise ConfigError("parameter 'window_size_ms' must not exceed 'clip_duration_ms'")
    snr = values["background_snr_db"]
    if snr and (len(snr) != 2 or snr[0] > snr[1]):
        raise ConfigError(f"parameter 'background_snr_db' must be empty or 'low,high' with low <= high, got {snr}")
    if (values["unknown_words"] or values["text_only"]) and not values["synthetic_voices"]:
        needs = "text_only" if values["text_only"] else "unknown_words"
        raise ConfigError(f"parameter {needs!r} needs synthetic_voices: the engines that say the words "
                          "(espeak-ng, flite, festival)")
    if values["validation_percentage"] + values["testing_percentage"] >= 100:
        raise ConfigError(
            "parameters 'validation_percentage' + 'testing_percentage' must leave speakers for training"
        )


def load_config(
    overrides: Mapping[str, Any] | None = None,
    path: Path | str | None = None,
    specs: Mapping[str, ParamSpec] | None = None,
) -> Config:
    """Defaults from config.yaml, then overrides (names must exist), validated."""
    specs = specs if specs is not None else load_param_specs(path)
    values = {name: coerce_value(spec, spec.default) for name, spec in specs.items()}
    for name, raw in (overrides or {}).items():
        if name not in specs:
            raise ConfigError(f"unknown parameter {name!r}")
        values[name] = coerce_value(specs[name], raw)
    _check_consistency(values)
    return Config(**values)


def config_from_dict(grouped: Mapping[str, Mapping[str, Any]], specs: Mapping[str, ParamSpec]) -> Config:
    """Rebuild a Config from a stored conf.json (grouped or flat)."""
    flat: dict[str, Any] = {}
    for key, value in grouped.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return load_config(flat, specs=specs)


def parse_cli_overrides(pairs: list[str]) -> dict[str, str]:
    """``key=value`` words from the command line into a dict (values still strings)."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = value
    return overrides
