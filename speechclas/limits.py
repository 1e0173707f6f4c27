"""Operator settings: every bound on a request or a training, read from the environment.

An operator (the person who runs ``deepaas-run``, the Docker image or
``speechclas-serve``) sets these; API callers cannot. Each setting has a
default that suits a 2-core, 24 GB machine. `SETTINGS` is the one list of
them: `Limits.from_env` parses it, README's operator table is generated
from it (``scripts/config_table.py``), and a malformed value is refused
with a message that names the variable.

Nothing is read at import: callers ask for ``Limits.from_env()`` when they
need it (cheap: a few ``os.environ`` look-ups), so a changed environment
takes effect for the next request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "SPEECHCLAS_"
MiB = 2**20
GiB = 2**30


class OperatorSettingError(ValueError):
    """An environment variable of the operator holds a value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One operator setting: the `Limits` field it fills, its type, default and what it bounds."""

    field: str
    kind: str  # int, float, bool, str, paths
    default: Any
    bounds: str
    minimum: float | None = None

    @property
    def env(self) -> str:
        return PREFIX + self.field.upper()


SETTINGS: tuple[Setting, ...] = (
    # --- prediction requests -------------------------------------------------------------
    Setting("max_audio_bytes", "int", 16 * MiB,
            "Size of one uploaded or downloaded audio file or archive to classify (bytes). `speechclas-serve` "
            "and speechclas-web derive their HTTP body limit from it and the detect limit below.", 1),
    Setting("max_audio_seconds", "float", 60.0,
            "Duration of one audio file (a clip to predict, a training clip, an archive member), read "
            "from its header before decoding and enforced while decoding (s).", 0.01),
    Setting("max_channels", "int", 8, "Channels of one audio file (prediction and training clips).", 1),
    Setting("min_sample_rate", "int", 1000, "Lowest sample rate accepted in an audio header (Hz).", 1),
    Setting("max_sample_rate", "int", 384000, "Highest sample rate accepted in an audio header (Hz).", 1),
    Setting("max_archive_members", "int", 10_000,
            "Files in one archive uploaded to predict (answered per file).", 1),
    Setting("max_archive_unpacked_bytes", "int", 256 * MiB,
            "Unpacked size of one archive uploaded to predict, read from its headers before unpacking (bytes).", 1),
    Setting("detect_max_audio_seconds", "float", 3600.0,
            "Duration of one recording to scan for keywords (predict `mode=detect`), read from its header "
            "and counted while decoding (s). `speechclas-detect` has its own bound (`--max-seconds`).", 0.01),
    Setting("detect_max_audio_bytes", "int", 128 * MiB,
            "Size of one audio file uploaded or downloaded for predict `mode=detect` (bytes); "
            "`max_audio_bytes` still bounds a clip.", 1),
    Setting("run", "str", "",
            "Pins the served run (a models/ folder name or `api`). Empty: models/api if present, "
            "else the newest finished run. A pinned run is never changed by a training."),
    # --- URLs (predict `urls` and training `data_url`) ------------------------------------
    Setting("allow_private_urls", "bool", False,
            "Allow URLs on loopback, link-local and private addresses (an internal file server)."),
    Setting("url_trust_env", "bool", False,
            "Let downloads use proxy settings (HTTP(S)_PROXY) and .netrc from the environment. Off: "
            "every download connects directly, so the address check sees the real peer."),
    Setting("url_connect_timeout_s", "float", 5.0, "Connecting to a URL's server (s).", 0.1),
    Setting("url_read_timeout_s", "float", 30.0, "Silence between two reads of a download (s).", 0.1),
    Setting("url_deadline_s", "float", 60.0, "Whole download of a predict URL, however it trickles (s).", 0.1),
    # --- trainings started through the API ------------------------------------------------
    Setting("models_dir", "str", "",
            "Folder of run folders, for serving and for API trainings. Empty: `models_dir` of "
            "etc/config.yaml (the project's models/)."),
    Setting("train_roots", "paths", "data:models",
            "Folders (`:`-separated, relative to the project) that `data_dir`, `data_splits_dir` and "
            "`start_checkpoint` of an API training must resolve inside, links followed."),
    Setting("data_url_max_bytes", "int", 4 * GiB, "Size of a `data_url` archive, downloaded and unpacked (bytes).", 1),
    Setting("data_url_deadline_s", "float", 1800.0, "Whole download of a `data_url` archive (s).", 1),
    Setting("download_cache_bytes", "int", 20 * GiB,
            "Total size of data/downloads/, the unpacked `data_url` archives; the least recently used "
            "are removed first (bytes).", 0),
    Setting("shard_cache_dir", "str", "",
            "Folder of the prepared datasets (every training decodes its data folder once into TFRecord "
            "shards there, reused by later trainings of the same clips). Empty: the project's data/shards/."),
    Setting("shard_cache_bytes", "int", 50 * GiB,
            "Total size of the prepared datasets; the least recently used are removed first, never one a "
            "training reads (bytes).", 0),
    Setting("in_memory_max_mb", "int", 1024,
            "Decoded clips (every split) up to which `data_loading=auto` holds a training's clips in memory; "
            "above it the training streams them from their shards (MB).", 0),
    Setting("max_train_steps", "int", 50_000, "Total steps of one API training (sum of the stages).", 1),
    Setting("max_batch_size", "int", 1024, "`batch_size` of an API training.", 1),
    Setting("max_clip_duration_ms", "int", 3000, "`clip_duration_ms` of an API training (ms).", 1),
    Setting("max_feature_cells", "int", 40_000,
            "Feature frames × bins of one clip of an API training (98 × 40 = 3920 for the defaults).", 1),
    Setting("train_memory_mb", "int", 12_288,
            "Memory an API training may need, estimated before it starts from its clips (decoded, "
            "augmented batches, cached evaluation features) (MB).", 1),
    Setting("max_synthetic_clips", "int", 10_000,
            "Clips an API training's `synthetic_voices` may say (engines × `synthetic_speakers` × words of "
            "its data); about 0.2 s of a CPU core each.", 0),
    Setting("max_labels", "int", 100, "Wanted words of one training.", 1),
    Setting("max_label_chars", "int", 64, "Characters of one label name.", 1),
    # --- MLflow tracking (on when MLflow's own MLFLOW_TRACKING_URI is set) ---------------
    Setting("mlflow_model_name", "str", "speechclas",
            "Registered model that each MLflow-tracked training adds a version to (its exports)."),
)

_BY_FIELD = {setting.field: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Limits:
    """The operator's bounds, one field per `SETTINGS` entry (same names)."""

    max_audio_bytes: int
    max_audio_seconds: float
    max_channels: int
    min_sample_rate: int
    max_sample_rate: int
    max_archive_members: int
    max_archive_unpacked_bytes: int
    detect_max_audio_seconds: float
    detect_max_audio_bytes: int
    run: str
    allow_private_urls: bool
    url_trust_env: bool
    url_connect_timeout_s: float
    url_read_timeout_s: float
    url_deadline_s: float
    models_dir: str
    train_roots: tuple[str, ...]
    data_url_max_bytes: int
    data_url_deadline_s: float
    download_cache_bytes: int
    shard_cache_dir: str
    shard_cache_bytes: int
    in_memory_max_mb: int
    max_train_steps: int
    max_batch_size: int
    max_clip_duration_ms: int
    max_feature_cells: int
    train_memory_mb: int
    max_synthetic_clips: int
    max_labels: int
    max_label_chars: int
    mlflow_model_name: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The settings in force: each variable that is set and not empty, else its default."""
        environ = os.environ if environ is None else environ
        values = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env, "").strip()
            values[setting.field] = _parse(setting, raw) if raw else _parse(setting, setting.default)
        return cls(**values)

    @classmethod
    def defaults(cls) -> Limits:
        return cls.from_env({})

    def replace(self, **changes) -> Limits:
        return dataclasses.replace(self, **changes)

    def client_max_size(self) -> int:
        """The HTTP body limit for ``deepaas-run --client-max-size``: the largest upload
        (a clip, an archive or a recording to detect in) plus the form around it."""
        return self.max_upload_bytes() + MiB

    def max_upload_bytes(self) -> int:
        """The largest file predict accepts, whatever its mode."""
        return max(self.max_audio_bytes, self.detect_max_audio_bytes)

    def train_root_paths(self, base_dir: Path) -> tuple[Path, ...]:
        """`train_roots` as absolute, resolved folders (relative ones are taken from `base_dir`)."""
        return tuple((base_dir / root).resolve() for root in self.train_roots)

    def resolved_models_dir(self, configured: Path) -> Path:
        """The models folder: this setting when set, else the one etc/config.yaml gives."""
        return Path(self.models_dir).expanduser().resolve() if self.models_dir else configured


def _parse(setting: Setting, raw: Any) -> Any:
    if not isinstance(raw, str):  # a default of the right type already
        return raw
    if setting.kind == "str":
        return raw
    if setting.kind == "paths":
        roots = tuple(part for part in raw.split(os.pathsep) if part)
        if not roots:
            raise OperatorSettingError(f"{setting.env} must name at least one folder, got {raw!r}")
        return roots
    if setting.kind == "bool":
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise OperatorSettingError(f"{setting.env} must be true or false (1/0, yes/no), got {raw!r}")
    try:
        value = int(raw) if setting.kind == "int" else float(raw)
    except ValueError:
        kind = "a whole number" if setting.kind == "int" else "a number"
        raise OperatorSettingError(f"{setting.env} must be {kind}, got {raw!r}") from None
    if setting.minimum is not None and not value >= setting.minimum:
        raise OperatorSettingError(f"{setting.env} must be at least {setting.minimum:g}, got {raw!r}")
    return value


def setting(field: str) -> Setting:
    """The description of one `Limits` field (its variable name for messages, its default)."""
    return _BY_FIELD[field]
