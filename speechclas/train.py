"""The step-driven training loop of the speech_commands recipe, in TF2.

Stages of (steps, learning rate); evaluation on the whole validation set
every `eval_step_interval` steps; checkpoints every `save_step_interval`
steps and at the end; resume from a checkpoint with the step count going on;
TensorBoard summaries; and at the end the test metrics and the exports.
Everything a run writes goes into its own models/<timestamp>/ folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from speechclas import architectures, data, export, export_accuracy, metrics, pipeline
from speechclas.config import Config, project_dir
from speechclas.features import FeatureSettings, settings_from_config
from speechclas.rundir import RunDir, create_run_dir

logger = logging.getLogger(__name__)

SUMMARY_EVERY_STEPS = 10
EVAL_BATCH_SIZE = 256
# Training examples (augmented, as the model saw them) that calibrate the int8 export.
REPRESENTATIVE_EXAMPLES = 300


class TrainingCancelled(Exception):
    """The caller asked the training to stop; the run stays unfinished."""


@dataclasses.dataclass
class TrainingResult:
    run: RunDir
    metrics: dict
    exports: dict[str, str]

    def summary(self) -> dict:
        """What a caller shows: where it went and how good it is."""
        return {
            "run": self.run.name,
            "run_dir": str(self.run.root),
            "steps": self.metrics["steps"],
            "duration_s": self.metrics["duration_s"],
            "train_accuracy": self.metrics["training"]["accuracy"],
            "validation_accuracy": self.metrics["validation"]["accuracy"],
            "test_accuracy": self.metrics["testing"]["accuracy"],
            "exports": self.exports,
        }


@dataclasses.dataclass(frozen=True)
class PreparedData:
    index: data.DatasetIndex
    training: pipeline.TrainingAudio
    evaluation: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (int16 audio, labels)


def resolve_data_dir(config: Config, base_dir: Path | None = None) -> Path:
    """The folder of label folders: data_dir, or data_url's archive unpacked
    once into data/downloads/<hash of the URL>/ and reused by later runs."""
    if not config.data_url:
        return config.path("data_dir", base_dir)
    from speechclas.archive import download_and_extract

    downloads = (base_dir or project_dir()) / "data" / "downloads"
    target = downloads / hashlib.sha1(config.data_url.encode("utf-8")).hexdigest()[:16]
    complete = target.with_name(target.name + ".complete")
    if complete.is_file():
        data_dir = Path(complete.read_text().strip())
        logger.info("Using %s, downloaded earlier from %s", data_dir, config.data_url)
        return data_dir
    if target.exists():
        shutil.rmtree(target)  # an interrupted earlier download
    downloads.mkdir(parents=True, exist_ok=True)
    data_dir = download_and_extract(config.data_url, target)
    complete.write_text(str(data_dir))
    return data_dir


def prepare_data(config: Config, settings: FeatureSettings, data_dir: Path, splits_dir: Path) -> PreparedData:
    """Index, split and load every clip once; errors here come before any run folder."""
    index = data.index_dataset(
        data_dir, config.wanted_words, config.validation_percentage, config.testing_percentage, splits_dir
    )

    def load(paths):
        return data.load_clips(data_dir, paths, settings.sample_rate, settings.desired_samples)

    wanted = index.wanted("training")
    unknown = index.unknown("training")
    training = pipeline.TrainingAudio(
        wanted_audio=load(e.path for e in wanted),
        wanted_labels=np.array([index.label_index(e.word) for e in wanted], np.int32),
        unknown_audio=load(e.path for e in unknown),
        unknown_label=index.label_index(data.UNKNOWN_LABEL),
        silence_label=index.label_index(data.SILENCE_LABEL),
        background=data.load_background(data_dir, index.background_files, settings.sample_rate, settings.desired_samples),
    )
    evaluation = {}
    for number, split in enumerate(data.SPLITS):
        paths, labels = data.evaluation_examples(
            index, split, config.silence_percentage, config.unknown_percentage, config.random_seed
        )
        audio = load(paths)
        silent = np.flatnonzero([path is None for path in paths])
        data.fill_silence(audio, silent, training.background, seed=config.random_seed + number)
        evaluation[split] = (audio, np.array(labels, np.int32))
    return PreparedData(index=index, training=training, evaluation=evaluation)


def make_optimizer(name: str, learning_rate: float):
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate)
    if name == "momentum":
        return tf.keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def stage_learning_rate(step: int, steps: tuple[int, ...], rates: tuple[float, ...]) -> float:
    """Learning rate of the stage that `step` (0-based) falls in."""
    boundary = 0
    for stage_steps, rate in zip(steps, rates, strict=True):
        boundary += stage_steps
        if step < boundary:
            return rate
    return rates[-1]


def training_pipeline(config: Config, settings: FeatureSettings, audio: pipeline.TrainingAudio) -> tf.data.Dataset:
    """The augmenting, endless training dataset for this configuration."""
    augment_settings = pipeline.AugmentSettings(
        time_shift_samples=int(settings.sample_rate * config.time_shift_ms / 1000),
        background_volume=config.background_volume,
        background_frequency=config.background_frequency,
        silence_label=audio.silence_label,
    )
    return pipeline.training_dataset(
        audio, settings, augment_settings, config.batch_size,
        config.silence_percentage, config.unknown_percentage, config.random_seed,
    )


def make_train_step(model, optimizer, global_step: tf.Variable, check_nans: bool):
    """One compiled optimisation step: (features, labels) -> (loss, accuracy).

    The model runs with training=True here only (dropout on, batch-norm
    statistics updated); every evaluation calls it with training=False.
    """
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(features, batch_labels):
        with tf.GradientTape() as tape:
            logits = model(features, training=True)
            loss = loss_fn(batch_labels, logits)
        gradients = tape.gradient(loss, model.trainable_variables)
        if check_nans:
            loss = tf.debugging.check_numerics(loss, "training loss is not finite")
            gradients = [tf.debugging.check_numerics(g, "a gradient is not finite") for g in gradients]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        global_step.assign_add(1)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(predictions, batch_labels), tf.float32))
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


def restore_model(run: RunDir, config: Config):
    """Rebuild a run's network from its latest checkpoint (for tests, further
    training or exports made later)."""
    settings = settings_from_config(config)
    model = architectures.build_model(
        config.model_architecture, settings.input_shape, len(run.labels()), config.dropout_rate
    )
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
) -> TrainingResult:
    """Train one model as configured; answers the finished run and its metrics."""
    started = time.monotonic()
    settings = settings_from_config(config)
    data_dir = resolve_data_dir(config, base_dir)
    prepared = prepare_data(config, settings, data_dir, config.path("data_splits_dir", base_dir))
    index = prepared.index
    start_checkpoint = _resolve_checkpoint(config.start_checkpoint) if config.start_checkpoint else None

    run = create_run_dir(config.path("models_dir", base_dir))
    with _RunLogFile(run.logs / "train.log"):
        logger.info("Training run %s (%s) on %s", run.name, config.model_architecture, data_dir)
        run.conf_path.write_text(config.to_json())
        run.labels_path.write_text("".join(f"{label}\n" for label in index.labels))
        data.write_split_lists(index, run.dataset_files)
        result = _train_in_run(config, settings, prepared, run, start_checkpoint, progress, cancel, on_step, started)
        run.mark_finished()
        logger.info("Run %s finished: test accuracy %.3f", run.name, result.metrics["testing"]["accuracy"])
    return result


def _train_in_run(config, settings, prepared, run, start_checkpoint, progress, cancel, on_step, started):
    tf.random.set_seed(config.random_seed)
    index = prepared.index
    labels = list(index.labels)
    model = architectures.build_model(
        config.model_architecture, settings.input_shape, len(labels), config.dropout_rate
    )
    logger.info("Model %s: %d parameters", config.model_architecture, model.count_params())
    optimizer = make_optimizer(config.optimizer, config.learning_rate[0])
    optimizer.build(model.trainable_variables)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=global_step)
    manager = tf.train.CheckpointManager(checkpoint, str(run.ckpts), max_to_keep=5, checkpoint_name="ckpt")
    if start_checkpoint:
        checkpoint.restore(start_checkpoint).assert_existing_objects_matched()
        logger.info("Resumed from %s at step %d", start_checkpoint, int(global_step.numpy()))

    train_data = training_pipeline(config, settings, prepared.training)
    eval_data = {
        split: pipeline.evaluation_dataset(audio, split_labels, settings, EVAL_BATCH_SIZE)
        for split, (audio, split_labels) in prepared.evaluation.items()
    }
    train_step = make_train_step(model, optimizer, global_step, config.check_nans)

    train_writer = tf.summary.create_file_writer(str(run.logs / "train"))
    validation_writer = tf.summary.create_file_writer(str(run.logs / "validation"))
    total_steps = sum(config.how_many_training_steps)
    first_step = int(global_step.numpy())
    history = []
    if first_step >= total_steps:
        logger.warning("The checkpoint is at step %d, past the %d configured steps", first_step, total_steps)
    bar = tqdm(total=total_steps, initial=first_step, desc="Training", unit="step", disable=not progress)
    window_loss, window_accuracy, window_started = [], [], time.monotonic()
    batches = iter(train_data)
    for step in range(first_step, total_steps):
        if cancel is not None and cancel.is_set():
            manager.save(checkpoint_number=step)
            raise TrainingCancelled(f"training cancelled at step {step}; run {run.name} left unfinished")
        rate = stage_learning_rate(step, config.how_many_training_steps, config.learning_rate)
        optimizer.learning_rate = rate
        features, batch_labels = next(batches)
        loss, accuracy = train_step(features, batch_labels)
        done = step + 1
        window_loss.append(float(loss))
        window_accuracy.append(float(accuracy))
        if done % SUMMARY_EVERY_STEPS == 0 or done == total_steps:
            with train_writer.as_default(step=done):
                tf.summary.scalar("loss", np.mean(window_loss[-SUMMARY_EVERY_STEPS:]))
                tf.summary.scalar("accuracy", np.mean(window_accuracy[-SUMMARY_EVERY_STEPS:]))
                tf.summary.scalar("learning_rate", rate)
            bar.set_postfix(loss=f"{np.mean(window_loss[-SUMMARY_EVERY_STEPS:]):.3f}",
                            acc=f"{np.mean(window_accuracy[-SUMMARY_EVERY_STEPS:]):.3f}", lr=rate)
        bar.update(1)
        if on_step is not None:
            on_step(done, total_steps)
        if done % config.eval_step_interval == 0 or done == total_steps:
            elapsed = time.monotonic() - window_started
            logits, truth = predict_logits(model, eval_data["validation"])
            validation = metrics.classification_metrics(truth, logits.argmax(-1), labels)
            with validation_writer.as_default(step=done):
                tf.summary.scalar("accuracy", validation["accuracy"])
            history.append({"step": done, "validation_accuracy": validation["accuracy"],
                            "train_batch_accuracy": float(np.mean(window_accuracy)),
                            "train_loss": float(np.mean(window_loss))})
            logger.info(
                "Step %d/%d: %.1f steps/s, train accuracy %.3f, loss %.3f, validation accuracy %.3f (N=%d)",
                done, total_steps, len(window_loss) / max(elapsed, 1e-9), np.mean(window_accuracy),
                np.mean(window_loss), validation["accuracy"], len(truth),
            )
            logger.info("Validation confusion matrix (rows truth, columns predicted, %s):\n%s",
                        labels, _matrix_text(validation["confusion_matrix"]))
            window_loss, window_accuracy, window_started = [], [], time.monotonic()
        if done % config.save_step_interval == 0:
            manager.save(checkpoint_number=done)
    bar.close()
    manager.save(checkpoint_number=int(global_step.numpy()))
    train_writer.flush()
    validation_writer.flush()

    results = {}
    for split in data.SPLITS:
        logits, truth = predict_logits(model, eval_data[split])
        results[split] = metrics.classification_metrics(truth, logits.argmax(-1), labels)
    logger.info("Final accuracy: training %.3f, validation %.3f, testing %.3f",
                results["training"]["accuracy"], results["validation"]["accuracy"], results["testing"]["accuracy"])
    logger.info("Test confusion matrix (%s):\n%s", labels, _matrix_text(results["testing"]["confusion_matrix"]))

    calibration = representative_features(batches, REPRESENTATIVE_EXAMPLES)
    exports = export.export_all(export.InferenceModule(model, settings), run, calibration)
    exports_accuracy = export_accuracy.export_accuracies(run, settings, *prepared.evaluation["testing"])
    run_metrics = {
        "run": run.name,
        "labels": labels,
        "model_architecture": config.model_architecture,
        "parameter_count": int(model.count_params()),
        "steps": int(global_step.numpy()),
        "duration_s": round(time.monotonic() - started, 1),
        **results,
        "exports": exports_accuracy,
        "history": history,
    }
    run.metrics_path.write_text(json.dumps(run_metrics, indent=2))
    metrics.save_confusion_png(
        np.array(results["testing"]["confusion_matrix"]), labels, run.stats / "confusion_matrix_test.png",
        title=f"{run.name} test accuracy {results['testing']['accuracy']:.3f}",
    )
    return TrainingResult(run=run, metrics=run_metrics, exports=exports)
