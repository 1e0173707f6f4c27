"""The step-driven training loop of the speech_commands recipe, in TF2.

Stages of (steps, learning rate) or a warm-up and cosine schedule;
evaluation on the whole validation set
every `eval_step_interval` steps; checkpoints every `save_step_interval`
steps and at the end; resume from a checkpoint with the step count going on;
TensorBoard summaries; and at the end the test metrics and the exports.
Everything a run writes goes into its own models/<timestamp>/ folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from speechclas import (
    architectures,
    confine,
    data,
    datasource,
    distribution,
    export,
    export_accuracy,
    lexicon,
    metrics,
    normalization,
    pipeline,
    said,
    shards,
    streaming,
    tracking,
    voices,
)
from speechclas.audio import AudioLimits
from speechclas.config import Config
from speechclas.features import FeatureSettings, settings_from_config
from speechclas.limits import Limits
from speechclas.rundir import RunDir, create_run_dir

logger = logging.getLogger(__name__)

SUMMARY_EVERY_STEPS = 10
EVAL_BATCH_SIZE = 256
# Skipped clips named in metrics.json (all are in the log).
SKIPPED_EXAMPLES = 10
# Training examples (augmented, as the model saw them) that calibrate the int8 export.
REPRESENTATIVE_EXAMPLES = 300
# Training examples (augmented) whose per-bin statistics feature_normalization=dataset keeps.
NORMALIZATION_EXAMPLES = 1000


class TrainingCancelled(Exception):
    """The caller asked the training to stop; the run stays unfinished."""


@dataclasses.dataclass
class TrainingResult:
    run: RunDir | None  # None on a multi_worker worker other than the chief
    metrics: dict
    exports: dict[str, str]

    def summary(self) -> dict:
        """What a caller shows: where it went and how good it is (a multi_worker worker: its part)."""
        if self.run is None:
            return {"run": None, "task": self.metrics["task"], "steps": self.metrics["steps"],
                    "duration_s": self.metrics["duration_s"]}
        return {
            "run": self.run.name,
            "run_dir": str(self.run.root),
            "steps": self.metrics["steps"],
            "duration_s": self.metrics["duration_s"],
            "train_accuracy": self.metrics["training"]["accuracy"],
            "validation_accuracy": self.metrics["validation"]["accuracy"],
            "test_accuracy": self.metrics["testing"]["accuracy"],
            "validation_balanced_accuracy": self.metrics["validation"]["balanced_accuracy"],
            "test_balanced_accuracy": self.metrics["testing"]["balanced_accuracy"],
            "exports": self.exports,
            "labels": self.run.labels(),
        }


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A training's clips: in memory (`training` a TrainingAudio, `evaluation` arrays) or streamed
    from their shards (`training` a ShardSource, `evaluation_sources` per split)."""

    index: data.DatasetIndex
    training: pipeline.TrainingAudio | pipeline.ShardSource
    evaluation: dict[str, tuple[np.ndarray, np.ndarray]] | None  # split -> (int16 audio, labels); None: streamed
    skipped: tuple[data.SkippedClip, ...] = ()  # files left out, each once
    synthetic: shards.ShardSet | None = None  # clips of synthetic_voices added to training
    evaluation_sources: dict[str, pipeline.ShardEvaluation] | None = None  # split -> its shards; streamed only
    shards: shards.ShardSet | None = None  # the data folder's prepared clips
    babble: dict[str, np.ndarray] | None = None  # held-out split -> int16 clips of speech that is no keyword

    @property
    def streamed(self) -> bool:
        return self.evaluation is None

    @property
    def background(self) -> np.ndarray:
        return self.training.background

    def evaluation_elements(self, split: str) -> tf.data.Dataset:
        """(int16 audio, label) of a split's fixed evaluation set, in memory or from its shards."""
        if self.evaluation is not None:
            audio, labels = self.evaluation[split]
            return tf.data.Dataset.from_tensor_slices((audio, labels.astype(np.int32)))
        return pipeline.evaluation_elements(self.evaluation_sources[split])

    def evaluation_size(self, split: str) -> int:
        if self.evaluation is not None:
            return len(self.evaluation[split][1])
        return self.evaluation_sources[split].expected_size

    def clips(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's evaluation clips as arrays, for the exports' accuracies and the streaming
        evaluation: all of them in memory, the first shards.SAMPLED_CLIPS of the shards when streamed."""
        if self.evaluation is not None:
            return self.evaluation[split]
        return pipeline.take_clips(self.evaluation_elements(split), shards.SAMPLED_CLIPS)

    def skipped_summary(self) -> dict:
        """How many files were left out and a few of them, for metrics.json."""
        return {
            "count": len(self.skipped),
            "examples": [{"file": clip.path, "error": clip.reason} for clip in self.skipped[:SKIPPED_EXAMPLES]],
        }

    def synthetic_summary(self) -> dict:
        """How many clips synthetic_voices added and how many it could not make, for metrics.json."""
        clips = self.synthetic
        if clips is None:
            return {"clips": 0, "words": 0, "unknown_texts": 0, "failed": 0, "failed_examples": []}
        failures = clips.extra.get("failures", [])
        return {"clips": clips.clip_count(shards.SYNTHETIC_SPLIT), "words": len(clips.counts[shards.SYNTHETIC_SPLIT]),
                "unknown_texts": len(clips.extra.get("synthetic", {}).get("unknown", [])),
                "failed": len(failures),
                "failed_examples": [{"word": word, "speaker": speaker, "error": reason}
                                    for word, speaker, reason in failures[:SKIPPED_EXAMPLES]]}


def prepare_data(
    config: Config, settings: FeatureSettings, data_dir: Path, splits_dir: Path, limits: Limits | None = None,
    held: contextlib.ExitStack | None = None, base_dir: Path | None = None, progress: bool = False,
) -> PreparedData:
    """Index and split the folder, decode its clips once into shards (or reuse those of an
    earlier training, speechclas.shards), then hold them in memory or stream them
    (`shards.held_in_memory`); errors here come before any run folder.

    A clip that cannot be decoded or breaks the audio `limits` (default: the
    operator defaults) is skipped with its label, logged and counted; only a
    training split (or a wanted word) left without any usable clip is fatal.
    The shards are kept from eviction until `held` closes (without it, only while preparing).
    """
    limits = limits or Limits.defaults()
    index = data.index_dataset(
        data_dir, config.wanted_words, config.validation_percentage, config.testing_percentage, splits_dir
    )
    cache = shards.shard_cache(limits.shard_cache_dir, limits.shard_cache_bytes, base_dir)
    with contextlib.ExitStack() as local:
        stack = held if held is not None else local
        prepared = stack.enter_context(shards.prepare(
            cache, index, settings.sample_rate, settings.desired_samples, AudioLimits.from_limits(limits),
            progress=progress))
        skipped = {clip.path: clip for clip in prepared.skipped}
        words = sorted({e.word for e in index.splits["training"]})
        synthetic = synthesize_training_clips(config, settings, words, cache, stack)
        babble = babble_speech(config, settings, words, synthetic, cache, stack)
        background, skipped_noise = data.load_background(
            data_dir, index.background_files, settings.sample_rate, settings.desired_samples, limits=limits
        )
        skipped.update((clip.path, clip) for clip in skipped_noise)
        _check_usable(index, skipped, data_dir)
        clips = sum(len(index.splits[split]) for split in data.SPLITS)
        if shards.held_in_memory(config.data_loading, clips, settings.desired_samples, limits.in_memory_max_mb):
            loaded = _in_memory(config, index, prepared, synthetic, background, tuple(skipped.values()))
        else:
            logger.info("Streaming the training clips from %s (data_loading=%s)", prepared.folder,
                        config.data_loading)
            loaded = _streamed(config, index, prepared, synthetic, background, tuple(skipped.values()))
        return dataclasses.replace(loaded, babble=babble)


def _in_memory(config: Config, index: data.DatasetIndex, prepared: shards.ShardSet,
               synthetic: shards.ShardSet | None, background: np.ndarray, skipped) -> PreparedData:
    """Every clip of the shards in memory, in the index's order, as the training pipeline samples them."""
    samples = prepared.desired_samples
    clips = {clip.path: clip.audio for split in data.SPLITS
             for clip in shards.read_clips(prepared.split_files(split), samples)}

    def rows(paths) -> tuple[np.ndarray, list[int]]:
        kept = [i for i, path in enumerate(paths) if path is None or path in clips]
        audio = np.zeros((len(kept), samples), np.int16)
        for row, i in enumerate(kept):
            if paths[i] is not None:
                audio[row] = clips[paths[i]]
        return audio, kept

    wanted = index.wanted("training")
    wanted_audio, kept = rows([e.path for e in wanted])
    wanted_labels = [index.label_index(wanted[i].word) for i in kept]
    unknown_audio, _ = rows([e.path for e in index.unknown("training")])
    if synthetic is not None:
        said = shards.read_clips(synthetic.split_files(shards.SYNTHETIC_SPLIT), samples)
        said_wanted = [clip for clip in said if clip.label in index.labels]
        said_other = [clip.audio for clip in said if clip.label not in index.labels]
        if said_wanted:
            wanted_audio = np.concatenate([wanted_audio, np.stack([clip.audio for clip in said_wanted])])
            wanted_labels += [index.label_index(clip.label) for clip in said_wanted]
        if said_other:
            unknown_audio = np.concatenate([unknown_audio, np.stack(said_other)])
    training = pipeline.TrainingAudio(
        wanted_audio=wanted_audio,
        wanted_labels=np.array(wanted_labels, np.int32),
        unknown_audio=unknown_audio,
        unknown_label=index.label_index(data.UNKNOWN_LABEL),
        silence_label=index.label_index(data.SILENCE_LABEL),
        background=background,
        label_count=len(index.labels),
    )
    evaluation = {}
    for number, split in enumerate(data.SPLITS):
        paths, labels = data.evaluation_examples(
            index, split, config.silence_percentage, config.unknown_percentage, config.random_seed
        )
        audio, kept = rows(paths)
        silent = np.flatnonzero([paths[i] is None for i in kept])
        data.fill_silence(audio, silent, background, seed=config.random_seed + number)
        evaluation[split] = (audio, np.array(labels, np.int32)[kept])
    return PreparedData(index=index, training=training, evaluation=evaluation, skipped=skipped,
                        synthetic=synthetic, shards=prepared)


def _streamed(config: Config, index: data.DatasetIndex, prepared: shards.ShardSet,
              synthetic: shards.ShardSet | None, background: np.ndarray, skipped) -> PreparedData:
    """The training and evaluation sets read from the shards as they train: memory set by the shuffle buffer."""
    wanted_words = index.labels[2:]
    files = prepared.split_files("training")
    file_labels = prepared.file_labels("training")
    has_unknown = prepared.clip_count("training") > prepared.clip_count("training", wanted_words)
    if synthetic is not None:
        files += synthetic.split_files(shards.SYNTHETIC_SPLIT)
        file_labels += synthetic.file_labels(shards.SYNTHETIC_SPLIT)
        said = synthetic.counts[shards.SYNTHETIC_SPLIT]
        has_unknown = has_unknown or any(word not in wanted_words for word in said)
    unknown_label, silence_label = index.label_index(data.UNKNOWN_LABEL), index.label_index(data.SILENCE_LABEL)
    training = pipeline.ShardSource(
        files=tuple(files), file_labels=tuple(frozenset(labels) for labels in file_labels), labels=index.labels, unknown_label=unknown_label, silence_label=silence_label,
        has_unknown=has_unknown, background=background, desired_samples=prepared.desired_samples,
        shuffle_buffer=config.shuffle_buffer,
    )
    sources = {}
    for number, split in enumerate(data.SPLITS):
        wanted = prepared.clip_count(split, wanted_words)
        other = prepared.clip_count(split) - wanted
        unknown_wanted = math.ceil(wanted * config.unknown_percentage / 100)
        silence = math.ceil(wanted * config.silence_percentage / 100) if wanted else 0
        sources[split] = pipeline.ShardEvaluation(
            files=tuple(prepared.split_files(split)), labels=index.labels, unknown_label=unknown_label,
            silence_label=silence_label, desired_samples=prepared.desired_samples,
            unknown_share=min(1.0, unknown_wanted / other) if other else 0.0,
            silence_count=silence, background=background, seed=config.random_seed + number,
            expected_size=wanted + min(unknown_wanted, other) + silence,
        )
    return PreparedData(index=index, training=training, evaluation=None, skipped=skipped, synthetic=synthetic,
                        evaluation_sources=sources, shards=prepared)


@contextlib.contextmanager
def _said_data_dir(config: Config, settings: FeatureSettings, data_dir: Path, limits: Limits,
                   base_dir: Path | None):
    """A text_only training's data folder (speechclas.said), said now or reused; an engine that cannot run
    is a DataError."""
    cache = said.said_cache(shards.shard_cache(limits.shard_cache_dir, limits.shard_cache_bytes, base_dir).folder,
                            limits.shard_cache_bytes)
    try:
        voices.check_engines(config.synthetic_voices)
        with said.said_folder(config, settings.sample_rate, settings.desired_samples, data_dir, cache) as (folder, _):
            yield folder
    except voices.VoicesError as exc:
        raise data.DataError(str(exc)) from None


def synthesize_training_clips(
    config: Config, settings: FeatureSettings, words: list[str], cache: shards.ShardCache,
    held: contextlib.ExitStack,
) -> shards.ShardSet | None:
    """The training words said by `config.synthetic_speakers` speakers of each engine of
    `config.synthetic_voices` (None when it is empty), and the texts of `config.unknown_words`
    (speechclas.lexicon) once each, as shards in the cache: said once, reused by a later training
    with the same words, engines, speakers and seed. An engine that cannot run is a DataError."""
    if not config.synthetic_voices or config.text_only:  # text_only: every clip is in its said folder
        return None
    unknown = lexicon.unknown_texts(config.wanted_words, config.unknown_words, config.unknown_word_clips,
                                    config.random_seed, reserved=words) if config.unknown_words else []
    description = {"words": sorted(words), "engines": list(config.synthetic_voices),
                   "speakers": config.synthetic_speakers, "seed": config.random_seed,
                   "sample_rate": settings.sample_rate, "desired_samples": settings.desired_samples,
                   "unknown": unknown}

    def say(staging: Path) -> dict:
        clips_said = voices.synthesize_clips(
            words, config.synthetic_voices, config.synthetic_speakers, config.random_seed, settings.sample_rate,
            settings.desired_samples, jobs=os.cpu_count() or 1, unknown=unknown,
        )
        clips = (shards.Clip(audio, word, "synthetic", shards.SYNTHETIC_SPLIT, f"synthetic/{number}/{word}")
                 for number, (audio, word) in enumerate(zip(clips_said.audio, clips_said.words, strict=True)))
        return shards.write_clips(staging, shards.SYNTHETIC_SPLIT, clips, settings.sample_rate,
                                  settings.desired_samples, failures=[list(f) for f in clips_said.failures],
                                  synthetic=description)

    try:
        voices.check_engines(config.synthetic_voices)
        return held.enter_context(shards.open_entry(cache, shards.synthetic_key(description), say))
    except voices.VoicesError as exc:
        raise data.DataError(str(exc)) from None


BABBLE_SPEAKERS = 8  # speakers of each engine who say a split's babble
BABBLE_SEED = 7919  # added to random_seed: speakers and words that the training never drew


def babble_speech(
    config: Config, settings: FeatureSettings, words: list[str], synthetic: shards.ShardSet | None,
    cache: shards.ShardCache, held: contextlib.ExitStack,
) -> dict[str, np.ndarray] | None:
    """Per held-out split, `config.babble_clips` clips of speech that is no keyword, for the
    streaming evaluation's babble streams: lexicon words and phrases that neither the data
    nor the training's unknown_words hold, said by speakers of the synthetic_voices engines
    drawn from another seed than the training's. None without engines or clips (the
    streaming evaluation then makes its babble of each split's unknown clips)."""
    if not config.synthetic_voices or config.babble_clips <= 0 or config.streaming_minutes <= 0:
        return None
    trained = list(synthetic.extra.get("synthetic", {}).get("unknown", [])) if synthetic is not None else []
    babble = {}
    for number, split in enumerate(("validation", "testing")):
        seed = config.random_seed + BABBLE_SEED + number
        texts = lexicon.unknown_texts(config.wanted_words, [lexicon.LEXICON_ITEM], config.babble_clips, seed,
                                      reserved=[*words, *trained])
        description = {"babble": split, "texts": texts, "engines": list(config.synthetic_voices),
                       "speakers": BABBLE_SPEAKERS, "seed": seed, "sample_rate": settings.sample_rate,
                       "desired_samples": settings.desired_samples}

        def say(staging: Path, texts=texts, seed=seed, description=description) -> dict:
            clips_said = voices.synthesize_clips([], config.synthetic_voices, BABBLE_SPEAKERS, seed,
                                                 settings.sample_rate, settings.desired_samples,
                                                 jobs=os.cpu_count() or 1, unknown=texts)
            clips = (shards.Clip(audio, text, "babble", shards.SYNTHETIC_SPLIT, f"babble/{number}/{text}")
                     for number, (audio, text) in enumerate(zip(clips_said.audio, clips_said.words, strict=True)))
            return shards.write_clips(staging, shards.SYNTHETIC_SPLIT, clips, settings.sample_rate,
                                      settings.desired_samples, synthetic=description)

        try:
            entry = held.enter_context(shards.open_entry(cache, shards.synthetic_key(description), say))
        except voices.VoicesError as exc:
            raise data.DataError(str(exc)) from None
        said_clips = shards.read_clips(entry.split_files(shards.SYNTHETIC_SPLIT), settings.desired_samples)
        babble[split] = np.stack([clip.audio for clip in said_clips]) if said_clips else None
    return {split: clips for split, clips in babble.items() if clips is not None} or None


def _check_usable(index: data.DatasetIndex, skipped: dict[str, data.SkippedClip], data_dir: Path) -> None:
    """The rules of data.index_dataset again, after the unusable clips are left out."""
    if not skipped:
        return
    logger.warning("Skipped %d files of %s that cannot be used (see the warnings above)", len(skipped), data_dir)
    if all(e.path in skipped for e in index.splits["training"]):
        raise data.DataError(f"no usable clip left in the training split of {data_dir}: all {len(skipped)} "
                             f"were skipped, e.g. {next(iter(skipped.values())).reason}")
    usable = {e.word for split in data.SPLITS for e in index.splits[split] if e.path not in skipped}
    lost = [word for word in index.labels[2:] if word not in usable]
    if lost:
        raise data.DataError(f"wanted words with no usable clip in {data_dir}: {', '.join(lost)}")


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0):
    """The named Keras optimizer; `weight_decay` is adamw's decoupled decay.

    Keras multiplies the decay by the optimizer's learning rate variable at
    every step, so the rate the loop sets each step scales the decay as well.
    """
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate)
    if name == "momentum":
        return tf.keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate)
    if name == "adamw":
        return tf.keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def exclude_from_weight_decay(optimizer, variables) -> None:
    """Decay only kernels: biases and normalisation scales and offsets (every
    variable of at most one dimension) keep their values. Call before build."""
    if getattr(optimizer, "weight_decay", None):
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])


def stage_learning_rate(step: int, steps: tuple[int, ...], rates: tuple[float, ...]) -> float:
    """Learning rate of the stage that `step` (0-based) falls in."""
    boundary = 0
    for stage_steps, rate in zip(steps, rates, strict=True):
        boundary += stage_steps
        if step < boundary:
            return rate
    return rates[-1]


def cosine_learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 (step 0) to `peak` (step `warmup_steps`), then a half
    cosine from `peak` down to `final` at `total_steps`, and `final` after it."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min((step - warmup_steps) / decay_steps, 1.0) if decay_steps > 0 else 1.0
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate_at(step: int, config: Config) -> float:
    """The configured learning rate of `step` (0-based): a pure function of the
    step, so a run resumed from a checkpoint continues its schedule.

    staged: each stage's rate, after `warmup_steps` of linear rise to the first
    rate; cosine: warm-up, then decay from the first rate to the last one (to 0
    when a single rate is given) over the rest of sum(how_many_training_steps).
    """
    steps, rates, warmup = config.how_many_training_steps, config.learning_rate, config.warmup_steps
    if config.learning_rate_schedule == "cosine":
        final = rates[-1] if len(rates) > 1 else 0.0
        return cosine_learning_rate(step, sum(steps), warmup, rates[0], final)
    if step < warmup:
        return rates[0] * step / warmup
    return stage_learning_rate(step, steps, rates)


def training_pipeline(config: Config, settings: FeatureSettings, audio, batch_size: int | None = None,
                      part: pipeline.InputShard | None = None, in_step: bool = False) -> tf.data.Dataset:
    """The augmenting, endless training dataset for this configuration (clips in memory or
    streamed): batches of (features, targets float32 [batch, labels]), targets being probability
    vectors; `batch_size` (default: the configured one) and `part` serve distributed input.
    `in_step`: batches of (int16 audio, labels, seed) that `batch_preparation` turns into those."""
    augment_settings = pipeline.augment_settings_from_config(config, settings, audio.silence_label)
    return pipeline.training_dataset(
        audio, settings, augment_settings, batch_size or config.batch_size,
        config.silence_percentage, config.unknown_percentage, config.random_seed, part=part or pipeline.InputShard(),
        augment_in_pipeline=not in_step,
    )


def batch_preparation(config: Config, settings: FeatureSettings, audio) -> Callable:
    """For augment_on=train_step: (int16 audio, labels, seed) -> (features, targets), the same
    function the input pipeline applies otherwise, compiled into the training step."""
    augment_settings = pipeline.augment_settings_from_config(config, settings, audio.silence_label)
    background = tf.constant(audio.background.astype(np.float32))

    def prepare(clips, labels, seed):
        return pipeline.augmented_batch(tf.cast(clips, tf.float32) / 32768.0, labels, background, settings,
                                        augment_settings, audio.label_count, seed)

    return prepare


def make_train_step(model, optimizer, global_step: tf.Variable, check_nans: bool, label_smoothing: float = 0.0,
                    strategy: tf.distribute.Strategy | None = None, prepare: Callable | None = None):
    """One compiled optimisation step: (features, targets) -> (loss, accuracy); with `prepare`
    (batch_preparation) the step takes the pipeline's raw batch and makes those itself, on its device.

    Targets are probability vectors [batch, labels] (one-hot or mixed); the loss
    is their cross-entropy with the softmax of the logits after label smoothing,
    the accuracy the share of argmax agreement. The model runs with
    training=True here only (dropout on, batch-norm statistics updated); every
    evaluation calls it with training=False.

    Under a `strategy` the inputs are per-replica batches: each replica runs the
    step on its own, Keras's loss divides by the number of replicas and the
    optimizer sums the gradients across them, so a step is one step of the global
    batch; the loss answered is the global batch's, the accuracy the replicas' mean.
    The step counter is counted once, outside the replicas.
    """
    loss_fn = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)

    def replica_step(*batch):
        features, targets = prepare(*batch) if prepare is not None else batch
        with tf.GradientTape() as tape:
            logits = model(features, training=True)
            loss = loss_fn(targets, logits)
        gradients = tape.gradient(loss, model.trainable_variables)
        if check_nans:
            loss = tf.debugging.check_numerics(loss, "training loss is not finite")
            gradients = [tf.debugging.check_numerics(g, "a gradient is not finite") for g in gradients]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        agree = tf.equal(tf.argmax(logits, axis=-1), tf.argmax(targets, axis=-1))
        return loss, tf.reduce_mean(tf.cast(agree, tf.float32))

    @tf.function
    def train_step(*batch):
        if strategy is None:
            loss, accuracy = replica_step(*batch)
        else:
            losses, accuracies = strategy.run(replica_step, args=batch)
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
            accuracy = strategy.reduce(tf.distribute.ReduceOp.MEAN, accuracies, axis=None)
        global_step.assign_add(1)
        return loss, accuracy

    return train_step


def predict_logits(model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode logits of a whole evaluation dataset, and its labels."""

    @tf.function(reduce_retracing=True)
    def forward(features):
        return model(features, training=False)

    logits, labels = [], []
    for features, batch_labels in dataset:
        logits.append(forward(features).numpy())
        labels.append(batch_labels.numpy())
    if not logits:
        return np.zeros((0, model.output_shape[-1]), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(logits), np.concatenate(labels)


def representative_features(batches, count: int) -> np.ndarray:
    """`count` training features from the pipeline's batches (words, unknown
    words, silence and noise mixed as in training), to calibrate int8."""
    taken, total = [], 0
    while total < count:
        features, _ = next(batches)
        taken.append(features.numpy())
        total += len(taken[-1])
    return np.concatenate(taken)[:count]


def _resolve_checkpoint(path: str) -> str:
    """A ckpts/ folder (its latest checkpoint) or a checkpoint prefix."""
    candidate = Path(path)
    if candidate.is_dir():
        latest = tf.train.latest_checkpoint(str(candidate))
        if latest is None:
            raise FileNotFoundError(f"start_checkpoint {path} holds no checkpoint")
        return latest
    if not Path(f"{path}.index").is_file():
        raise FileNotFoundError(f"start_checkpoint {path} is not a checkpoint (no {path}.index)")
    return path


def build_network(config: Config, settings: FeatureSettings, label_count: int, training_batches=None):
    """The configured architecture behind its feature normalisation (speechclas.normalization).

    feature_normalization=dataset measures its statistics on NORMALIZATION_EXAMPLES
    features taken from `training_batches` (the training pipeline's iterator); without
    them (a model rebuilt to restore a checkpoint) the checkpoint supplies them.
    """
    model = architectures.build_model(config.model_architecture, settings.input_shape, label_count,
                                      config.dropout_rate, width=config.model_width)
    statistics_features = None
    if config.feature_normalization == "dataset" and training_batches is not None:
        statistics_features = representative_features(training_batches, NORMALIZATION_EXAMPLES)
    return normalization.with_feature_normalization(model, config.feature_normalization, statistics_features)


def restore_model(run: RunDir, config: Config):
    """Rebuild a run's network from its latest checkpoint (for tests, further
    training or exports made later)."""
    settings = settings_from_config(config)
    model = build_network(config, settings, len(run.labels()))
    latest = tf.train.latest_checkpoint(str(run.ckpts))
    if latest is None:
        raise FileNotFoundError(f"run {run.name} has no checkpoint in {run.ckpts}")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial().assert_existing_objects_matched()
    return model


def _matrix_text(matrix) -> str:
    """The whole matrix, however many classes (numpy elides large ones)."""
    return np.array2string(np.asarray(matrix), threshold=np.inf, max_line_width=10_000)


class _RunLogFile:
    """Copies the package's log records into the run's logs/ while it trains."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("speechclas")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.previous_level = self.logger.level
            self.logger.setLevel(logging.INFO)
        else:
            self.previous_level = None
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if self.previous_level is not None:
            self.logger.setLevel(self.previous_level)


def train(
    config: Config,
    base_dir: Path | None = None,
    progress: bool = True,
    cancel: threading.Event | None = None,
    on_step: Callable[[int, int], None] | None = None,
    limits: Limits | None = None,
    tracker: tracking.Tracker | None = None,
    confined: bool = False,
    on_run: Callable[[RunDir], None] | None = None,
) -> TrainingResult:
    """Train one model as configured; answers the finished run and its metrics.

    `on_step(done, total)` is called after each step; `on_run(run)` once the run folder
    exists, its data prepared, before the first step (the chief only).

    `limits` (default: the defaults) bound a ``data_url`` download and the audio of each clip;
    `tracker` records the training elsewhere (MLflow, see speechclas.tracking); none by default.
    `confined` (a training requested through the API): its clips must also fit the operator's
    memory budget, checked once the data folder is known and before any clip is loaded.
    """
    tracker = tracker or tracking.Tracker()
    started = time.monotonic()
    # First: multi_worker reads TF_CONFIG and starts its servers before any other TensorFlow call.
    placement = distribution.place(config.distribution, config.replicas, config.collective_timeout_s)
    settings = settings_from_config(config)
    limits = limits or Limits.defaults()
    with contextlib.ExitStack() as held:
        with datasource.open_data_dir(config, base_dir, limits) as source:
            data_dir = source.data_dir
            splits_dir = config.path("data_splits_dir", base_dir)
            if config.text_only:  # the engines say the words into a data folder of their own
                data_dir = held.enter_context(_said_data_dir(config, settings, data_dir, limits, base_dir))
                source = datasource.DataSource(data_dir=data_dir)
                splits_dir = data_dir / said.SPLITS_FOLDER
            if confined:  # a data_url's clips are known only now
                confine.check_memory(config, settings, data_dir, splits_dir, limits)
            prepared = prepare_data(config, settings, data_dir, splits_dir, limits, held=held, base_dir=base_dir,
                                    progress=progress)
        start_checkpoint = _resolve_checkpoint(config.start_checkpoint) if config.start_checkpoint else None
        if not placement.is_chief:
            return _train_as_worker(config, settings, prepared, placement, start_checkpoint, progress, started)
        return _train_as_chief(config, settings, prepared, placement, source, start_checkpoint, base_dir, progress,
                               cancel, on_step, tracker, started, on_run)


def _train_as_worker(config, settings, prepared, placement, start_checkpoint, progress, started) -> TrainingResult:
    """A multi_worker worker other than the chief: the same steps, its checkpoints in a temporary
    folder of its own (removed at the end), no run folder, no exports."""
    with tempfile.TemporaryDirectory(prefix="speechclas-worker-") as scratch:
        run = create_run_dir(Path(scratch))
        logger.info("Training as %s of the cluster; the chief writes the run", placement.task)
        state = _fit_in_run(config, settings, prepared, run, placement, start_checkpoint=start_checkpoint,
                            control=LoopControl(progress), tracker=tracking.Tracker())[0]
        steps = state.step
    return TrainingResult(run=None, metrics={"steps": steps, "duration_s": round(time.monotonic() - started, 1),
                                             "task": placement.task}, exports={})


def _train_as_chief(config, settings, prepared, placement, source, start_checkpoint, base_dir, progress, cancel,
                    on_step, tracker, started, on_run=None) -> TrainingResult:
    """The one process that writes the run folder: every training but a multi_worker worker's."""
    index = prepared.index
    run = create_run_dir(config.path("models_dir", base_dir))
    with _RunLogFile(run.logs / "train.log"):
        logger.info("Training run %s (%s) on %s", run.name, config.model_architecture, source.data_dir)
        if prepared.skipped:
            logger.warning("Skipped %d files that cannot be used (metrics.json lists %d): %s", len(prepared.skipped),
                           SKIPPED_EXAMPLES, "; ".join(clip.path for clip in prepared.skipped[:SKIPPED_EXAMPLES]))
        if prepared.synthetic is not None:
            summary = prepared.synthetic_summary()
            logger.info("Added %d training clips of %d words said by %s (synthetic_voices), %d failed",
                        summary["clips"], summary["words"], ",".join(config.synthetic_voices), summary["failed"])
        run.conf_path.write_text(config.to_json())
        run.labels_path.write_text("".join(f"{label}\n" for label in index.labels))
        data.write_split_lists(index, run.dataset_files)
        datasource.write_record(run, source, index.splits_dir)
        if placement.kind != "none":
            logger.info("Distribution %s: %d replicas (%s), global batch %d, %d per replica", placement.kind,
                        placement.replicas, placement.task, config.batch_size, config.batch_size // placement.replicas)
        tracker.start(run, config)
        if on_run is not None:
            on_run(run)
        try:
            result = _train_in_run(config, settings, prepared, run, placement, start_checkpoint=start_checkpoint,
                                   control=LoopControl(progress, cancel, on_step), started=started, tracker=tracker)
        except BaseException as exc:
            tracker.end("KILLED" if isinstance(exc, (TrainingCancelled, KeyboardInterrupt)) else "FAILED")
            raise
        run.mark_finished()
        tracker.finish(run)
        logger.info("Run %s finished: test accuracy %.3f, balanced accuracy %.3f", run.name,
                    result.metrics["testing"]["accuracy"], result.metrics["testing"]["balanced_accuracy"])
    return result


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """The network, its optimizer and step counter, and the checkpoints they are saved in."""

    model: tf.keras.Model
    optimizer: tf.keras.optimizers.Optimizer
    global_step: tf.Variable
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager

    @property
    def step(self) -> int:
        return int(self.global_step.numpy())


@dataclasses.dataclass(frozen=True)
class LoopControl:
    """How a caller watches the loop (a progress bar, a per-step callback) and stops it."""

    progress: bool = True
    cancel: threading.Event | None = None
    on_step: Callable[[int, int], None] | None = None


def _fit_in_run(config, settings, prepared, run, placement, *, start_checkpoint, control, tracker):
    """Build the network under the placement's strategy and run the step loop; answers the
    state and the validation history. Checkpoints go to the run's ckpts/."""
    tf.random.set_seed(config.random_seed)
    labels = list(prepared.index.labels)
    in_step = config.augment_on == "train_step"
    batches = iter(distributed_pipeline(config, settings, prepared.training, placement, in_step))
    statistics = None  # feature_normalization=dataset's examples: training batches as one device sees them
    if config.feature_normalization == "dataset":
        local = placement.distributed_strategy is None and not in_step
        statistics = batches if local else local_batches(config, settings, prepared)
    with placement.strategy.scope():
        state = build(config, settings, labels, run.ckpts, start_checkpoint, statistics)
    validation = None
    if placement.is_chief:
        validation = evaluation_data(prepared, "validation", settings)
    train_step = make_train_step(state.model, state.optimizer, state.global_step, config.check_nans,
                                 config.label_smoothing, strategy=placement.distributed_strategy,
                                 prepare=batch_preparation(config, settings, prepared.training) if in_step else None)
    history = fit(state, train_step, batches, validation, labels, config, run, tracker, control,
                  worker=placement.describe_failure)
    return state, history, batches


def local_batches(config: Config, settings: FeatureSettings, prepared: PreparedData):
    """An iterator of whole training batches on this process, outside any strategy."""
    return iter(training_pipeline(config, settings, prepared.training))


def _train_in_run(config, settings, prepared, run, placement, *, start_checkpoint, control, started, tracker):
    """Build, fit, evaluate and write one run inside its folder."""
    state, history, batches = _fit_in_run(config, settings, prepared, run, placement,
                                          start_checkpoint=start_checkpoint, control=control, tracker=tracker)
    if placement.distributed_strategy is not None:  # evaluated and exported as one plain model
        state = dataclasses.replace(state, model=restore_model(run, config))
    if placement.distributed_strategy is not None or config.augment_on == "train_step":
        batches = local_batches(config, settings, prepared)  # feature batches calibrate the int8 export
    labels = list(prepared.index.labels)
    eval_data = {split: evaluation_data(prepared, split, settings) for split in data.SPLITS}
    results = evaluate(state.model, eval_data, labels)
    return write(state, config, settings, prepared, run, results, history, batches, started)


def evaluation_data(prepared: PreparedData, split: str, settings: FeatureSettings) -> tf.data.Dataset:
    """Feature batches of a split's evaluation set; cached in memory unless the features outgrow
    shards.EVAL_CACHE_BYTES (a streamed dataset's splits can be larger than memory)."""
    cells = settings.spectrogram_length * settings.fingerprint_width
    cache = prepared.evaluation_size(split) * cells * 4 <= shards.EVAL_CACHE_BYTES
    return pipeline.evaluation_batches(prepared.evaluation_elements(split), settings, EVAL_BATCH_SIZE, cache=cache)


def distributed_pipeline(config: Config, settings: FeatureSettings, audio, placement: distribution.Placement,
                         in_step: bool = False):
    """The training pipeline, or under a strategy one pipeline per worker at the per-replica batch
    size (tf.distribute's distribute_datasets_from_function), each worker on its own shards."""
    if placement.distributed_strategy is None:
        return training_pipeline(config, settings, audio, in_step=in_step)

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return training_pipeline(config, settings, audio, batch_size=context.get_per_replica_batch_size(
            config.batch_size), part=pipeline.InputShard.of(context), in_step=in_step)

    return placement.strategy.distribute_datasets_from_function(per_worker)


def build(config: Config, settings: FeatureSettings, labels: list[str], ckpts_dir: Path,
          start_checkpoint: str | None, training_batches=None) -> TrainingState:
    """A fresh network and optimizer, restored from `start_checkpoint` when given
    (the step count goes on from it); checkpoints go to `ckpts_dir`. `training_batches`
    (the pipeline's iterator) feed feature_normalization=dataset its statistics."""
    model = build_network(config, settings, len(labels), training_batches)
    logger.info("Model %s: %d parameters", config.model_architecture, model.count_params())
    optimizer = make_optimizer(config.optimizer, config.learning_rate[0], config.weight_decay)
    exclude_from_weight_decay(optimizer, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=global_step)
    manager = tf.train.CheckpointManager(checkpoint, str(ckpts_dir), max_to_keep=5, checkpoint_name="ckpt")
    if start_checkpoint:
        checkpoint.restore(start_checkpoint).assert_existing_objects_matched()
        logger.info("Resumed from %s at step %d", start_checkpoint, int(global_step.numpy()))
    return TrainingState(model, optimizer, global_step, checkpoint, manager)


class _Window:
    """Loss and accuracy of the training batches since the last evaluation."""

    def __init__(self):
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self.started = time.monotonic()

    def add(self, loss, accuracy) -> None:
        self.losses.append(float(loss))
        self.accuracies.append(float(accuracy))

    def recent(self) -> tuple[float, float]:
        """Mean loss and accuracy of the last SUMMARY_EVERY_STEPS steps."""
        return (float(np.mean(self.losses[-SUMMARY_EVERY_STEPS:])),
                float(np.mean(self.accuracies[-SUMMARY_EVERY_STEPS:])))


def fit(state: TrainingState, train_step, batches, validation_data: tf.data.Dataset | None, labels: list[str],
        config: Config, run: RunDir, tracker: tracking.Tracker, control: LoopControl,
        worker: Callable[[Exception], Exception] | None = None) -> list[dict]:
    """The step loop from the state's step to sum(how_many_training_steps), with
    the scheduled learning rate, summaries, validation every eval_step_interval
    steps and checkpoints; saves and raises TrainingCancelled when cancelled.
    Answers the history of validation results (none without `validation_data`).

    `worker` turns an error of the cluster's collectives (a peer that died or
    stopped answering) into the error the run fails with."""
    try:
        return _steps(state, train_step, batches, validation_data, labels, config, run, tracker, control)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.InternalError) as exc:
        if worker is None:
            raise
        raise worker(exc) from exc


def _steps(state, train_step, batches, validation_data, labels, config, run, tracker, control) -> list[dict]:
    total_steps = sum(config.how_many_training_steps)
    first_step = state.step
    if first_step >= total_steps:
        logger.warning("The checkpoint is at step %d, past the %d configured steps", first_step, total_steps)
    train_writer = tf.summary.create_file_writer(str(run.logs / "train"))
    validation_writer = tf.summary.create_file_writer(str(run.logs / "validation"))
    bar = tqdm(total=total_steps, initial=first_step, desc="Training", unit="step", disable=not control.progress)
    history, window = [], _Window()
    for step in range(first_step, total_steps):
        if control.cancel is not None and control.cancel.is_set():
            state.manager.save(checkpoint_number=step)
            raise TrainingCancelled(f"training cancelled at step {step}; run {run.name} left unfinished")
        rate = learning_rate_at(step, config)
        state.optimizer.learning_rate = rate
        window.add(*train_step(*next(batches)))
        done = step + 1
        if done % SUMMARY_EVERY_STEPS == 0 or done == total_steps:
            loss, accuracy = window.recent()
            with train_writer.as_default(step=done):
                tf.summary.scalar("loss", loss)
                tf.summary.scalar("accuracy", accuracy)
                tf.summary.scalar("learning_rate", rate)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", lr=rate)
        bar.update(1)
        if control.on_step is not None:
            control.on_step(done, total_steps)
        if validation_data is not None and (done % config.eval_step_interval == 0 or done == total_steps):
            history.append(_validate(state.model, validation_data, labels, validation_writer, done, total_steps,
                                     window))
            tracker.log_evaluation(history[-1])
            window = _Window()
        if done % config.save_step_interval == 0:
            state.manager.save(checkpoint_number=done)
    bar.close()
    state.manager.save(checkpoint_number=state.step)
    train_writer.flush()
    validation_writer.flush()
    return history


def _validate(model, validation_data, labels, writer, done: int, total_steps: int, window: _Window) -> dict:
    """Score the whole validation set at step `done`; log it and answer its history entry."""
    elapsed = time.monotonic() - window.started
    logits, truth = predict_logits(model, validation_data)
    validation = metrics.classification_metrics(truth, logits.argmax(-1), labels)
    with writer.as_default(step=done):
        tf.summary.scalar("accuracy", validation["accuracy"])
        tf.summary.scalar("balanced_accuracy", validation["balanced_accuracy"])
    logger.info(
        "Step %d/%d: %.1f steps/s, train accuracy %.3f, loss %.3f, validation accuracy %.3f, "
        "balanced accuracy %.3f (N=%d)",
        done, total_steps, len(window.losses) / max(elapsed, 1e-9), np.mean(window.accuracies),
        np.mean(window.losses), validation["accuracy"], validation["balanced_accuracy"], len(truth),
    )
    logger.info("Validation confusion matrix (rows truth, columns predicted, %s):\n%s",
                labels, _matrix_text(validation["confusion_matrix"]))
    return {"step": done, "validation_accuracy": validation["accuracy"],
            "validation_balanced_accuracy": validation["balanced_accuracy"],
            "train_batch_accuracy": float(np.mean(window.accuracies)),
            "train_loss": float(np.mean(window.losses))}


def evaluate(model, eval_data: dict[str, tf.data.Dataset], labels: list[str]) -> dict[str, dict]:
    """Final metrics of every split, scored in inference mode as the exports run."""
    results = {}
    for split in data.SPLITS:
        logits, truth = predict_logits(model, eval_data[split])
        results[split] = metrics.classification_metrics(truth, logits.argmax(-1), labels)
    logger.info("Final accuracy: training %.3f, validation %.3f, testing %.3f; balanced accuracy: validation %.3f, "
                "testing %.3f", results["training"]["accuracy"], results["validation"]["accuracy"],
                results["testing"]["accuracy"], results["validation"]["balanced_accuracy"],
                results["testing"]["balanced_accuracy"])
    logger.info("Test confusion matrix (%s):\n%s", labels, _matrix_text(results["testing"]["confusion_matrix"]))
    return results


def write(state: TrainingState, config: Config, settings: FeatureSettings, prepared: PreparedData, run: RunDir,
          results: dict[str, dict], history: list[dict], batches, started: float) -> TrainingResult:
    """The exports (calibrated on training `batches`), their test accuracies, the
    streaming evaluation, metrics.json and the test confusion picture."""
    model, labels = state.model, list(prepared.index.labels)
    calibration = representative_features(batches, REPRESENTATIVE_EXAMPLES)
    exports = export.export_all(export.InferenceModule(model, settings), run, calibration)
    scored = {split: prepared.clips(split) for split in ("validation", "testing")}
    exports_accuracy = export_accuracy.export_accuracies(run, settings, *scored["testing"])
    streamed = streaming.evaluate_trained_model(
        model, settings, labels, scored, prepared.training.background, config, run.stats, babble=prepared.babble
    )
    run_metrics = {
        "run": run.name,
        "labels": labels,
        "model_architecture": config.model_architecture,
        "parameter_count": int(model.count_params()),
        "steps": state.step,
        "duration_s": round(time.monotonic() - started, 1),
        **results,
        "skipped_clips": prepared.skipped_summary(),
        "synthetic_clips": prepared.synthetic_summary(),
        "exports": exports_accuracy,
        "history": history,
    }
    if streamed is not None:
        run_metrics["streaming"] = streamed
    run.metrics_path.write_text(json.dumps(run_metrics, indent=2))
    metrics.save_confusion_png(
        np.array(results["testing"]["confusion_matrix"]), labels, run.stats / "confusion_matrix_test.png",
        title=f"{run.name} test accuracy {results['testing']['accuracy']:.3f}",
    )
    return TrainingResult(run=run, metrics=run_metrics, exports=exports)
