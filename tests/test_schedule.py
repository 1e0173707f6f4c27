"""Training options without a training: the learning-rate schedules, label
smoothing and soft targets in the train step, adamw's decoupled weight decay,
and balanced accuracy."""

import math

import numpy as np
import pytest
import tensorflow as tf

from speechclas.config import ConfigError, load_config
from speechclas.metrics import classification_metrics
from speechclas.train import exclude_from_weight_decay, learning_rate_at, make_optimizer, make_train_step


def schedule(**overrides):
    values = {"how_many_training_steps": "100,100", "learning_rate": "0.01,0.001"}
    values.update(overrides)
    return load_config(values)


def test_cosine_warms_up_from_zero_then_decays_to_the_last_rate():
    config = schedule(learning_rate_schedule="cosine", warmup_steps=20)
    assert learning_rate_at(0, config) == 0.0
    assert learning_rate_at(10, config) == pytest.approx(0.005)
    assert learning_rate_at(20, config) == pytest.approx(0.01)  # warm-up ends at the first rate
    # Halfway through the 180 decay steps the half cosine is at the middle of the two rates.
    assert learning_rate_at(20 + 90, config) == pytest.approx((0.01 + 0.001) / 2)
    assert learning_rate_at(20 + 45, config) == pytest.approx(0.001 + 0.009 * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate_at(200, config) == pytest.approx(0.001)
    assert learning_rate_at(350, config) == pytest.approx(0.001)  # resumed past the end: the last rate
    rates = [learning_rate_at(step, config) for step in range(20, 200)]
    assert all(later < earlier for earlier, later in zip(rates, rates[1:], strict=False))


def test_cosine_with_one_rate_decays_to_zero_and_without_warm_up_starts_at_the_rate():
    config = schedule(learning_rate_schedule="cosine", how_many_training_steps="300", learning_rate="0.002")
    assert learning_rate_at(0, config) == pytest.approx(0.002)
    assert learning_rate_at(150, config) == pytest.approx(0.001)
    assert learning_rate_at(300, config) == pytest.approx(0.0, abs=1e-12)


def test_staged_schedule_keeps_its_stages_after_an_optional_warm_up():
    staged = schedule()
    assert [learning_rate_at(step, staged) for step in (0, 99, 100, 199, 250)] == [0.01, 0.01, 0.001, 0.001, 0.001]
    warmed = schedule(warmup_steps=10)
    assert learning_rate_at(0, warmed) == 0.0
    assert learning_rate_at(5, warmed) == pytest.approx(0.005)
    assert [learning_rate_at(step, warmed) for step in (10, 99, 100)] == [0.01, 0.01, 0.001]


def test_weight_decay_is_refused_without_adamw():
    with pytest.raises(ConfigError, match="weight_decay"):
        load_config({"optimizer": "adam", "weight_decay": 0.01})
    assert load_config({"optimizer": "adamw", "weight_decay": 0.01}).weight_decay == 0.01


def fixed_dense_model(kernel: np.ndarray, bias: np.ndarray) -> tf.keras.Model:
    inputs = tf.keras.Input(shape=(kernel.shape[0],))
    layer = tf.keras.layers.Dense(kernel.shape[1])
    model = tf.keras.Model(inputs, layer(inputs))
    layer.set_weights([kernel, bias])
    return model


def test_train_step_loss_is_cross_entropy_with_smoothed_targets_and_accuracy_is_argmax_agreement():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    features = rng.normal(size=(2, 3)).astype(np.float32)
    # One one-hot target, one mixed as mixup makes them.
    targets = np.array([[0, 0, 1, 0], [0.3, 0.7, 0, 0]], np.float32)
    logits = features @ kernel + bias
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    smoothing = 0.2
    smoothed = targets * (1 - smoothing) + smoothing / 4
    expected_loss = float(np.mean(-(smoothed * log_softmax).sum(axis=1)))
    plain_loss = float(np.mean(-(targets * log_softmax).sum(axis=1)))
    assert abs(expected_loss - plain_loss) > 0.05  # the smoothing matters for these logits
    expected_accuracy = float(np.mean(logits.argmax(1) == targets.argmax(1)))

    for value, wanted in ((smoothing, expected_loss), (0.0, plain_loss)):
        model = fixed_dense_model(kernel, bias)
        optimizer = make_optimizer("sgd", 0.0)
        optimizer.build(model.trainable_variables)
        step = make_train_step(model, optimizer, tf.Variable(0, dtype=tf.int64), check_nans=True,
                               label_smoothing=value)
        loss, accuracy = step(tf.constant(features), tf.constant(targets))
        assert float(loss) == pytest.approx(wanted, rel=1e-5)
        assert float(accuracy) == pytest.approx(expected_accuracy)


def test_adamw_decays_kernels_by_the_current_learning_rate_and_leaves_biases():
    kernel, bias = np.ones((3, 2), np.float32), np.ones(2, np.float32)
    model = fixed_dense_model(kernel, bias)
    optimizer = make_optimizer("adamw", 0.001, weight_decay=0.5)
    exclude_from_weight_decay(optimizer, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    zero_gradients = [tf.zeros_like(v) for v in model.trainable_variables]  # Adam's own update is then 0
    for rate, factor in ((0.1, 1 - 0.1 * 0.5), (0.2, 1 - 0.2 * 0.5)):
        optimizer.learning_rate = rate  # as the training loop sets it every step
        before = model.get_weights()
        optimizer.apply_gradients(zip(zero_gradients, model.trainable_variables, strict=True))
        after = model.get_weights()
        np.testing.assert_allclose(after[0], before[0] * factor, rtol=1e-6)
        np.testing.assert_array_equal(after[1], before[1])


def test_balanced_accuracy_is_the_mean_recall_of_the_labels_in_the_truth():
    labels = ["_silence_", "_unknown_", "yes", "no"]
    truth = [1, 1, 1, 1, 1, 1, 2, 2, 3, 3]
    predicted = [1, 1, 1, 1, 1, 1, 2, 1, 1, 1]  # everything _unknown_ but one "yes"
    result = classification_metrics(truth, predicted, labels)
    assert result["accuracy"] == pytest.approx(0.7)
    # _silence_ has no clip and does not count: recalls 1, 0.5 and 0.
    assert result["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert classification_metrics([], [], labels)["balanced_accuracy"] == 0.0
