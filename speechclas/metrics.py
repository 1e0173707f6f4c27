"""Classification metrics (scikit-learn) and the confusion-matrix picture.

Shared by training (stats/metrics.json) and batch prediction, so both
report the same numbers in the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_metrics(truth: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support and
    the confusion matrix (rows: true label, columns: predicted, in `labels` order)."""
    truth = np.asarray(truth, dtype=int)
    predicted = np.asarray(predicted, dtype=int)
    classes = list(range(len(labels)))
    matrix = confusion_matrix(truth, predicted, labels=classes) if len(truth) else np.zeros((len(labels),) * 2, int)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0
    ) if len(truth) else (np.zeros(len(labels)),) * 3 + (np.zeros(len(labels), int),)
    return {
        "accuracy": float(np.mean(truth == predicted)) if len(truth) else 0.0,
        "balanced_accuracy": balanced_accuracy(recall, support),
        "count": int(len(truth)),
        "labels": list(labels),
        "per_class": {
            label: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": matrix.astype(int).tolist(),
    }


def balanced_accuracy(recall: np.ndarray, support: np.ndarray) -> float:
    """Mean recall over the labels present in the truth: every such label counts
    the same however many clips it has, so answering `_unknown_` for the many
    unknown words cannot hide keywords that are never recognised."""
    present = np.asarray(support) > 0
    return float(np.mean(np.asarray(recall)[present])) if present.any() else 0.0


def save_confusion_png(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str = "", normalize: bool = True) -> None:
    """A labelled heat map of a confusion matrix (row-normalised by default)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, dtype=float)
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    size = 2.5 + 0.45 * len(labels)
    figure = Figure(figsize=(size, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for row in range(len(labels)):
        for column in range(len(labels)):
            if matrix[row, column]:
                axes.text(column, row, int(matrix[row, column]), ha="center", va="center", fontsize=7,
                          color="white" if shown[row, column] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
