"""Both notebooks run top to bottom (nbclient) on the demo data and the session's tiny run.

They take their parameters from environment variables, which the kernel
inherits. The kernel is ipykernel's own ``python3`` spec for this interpreter
(jupyter_client starts it with ``sys.executable``), so it sees this package.
"""

from __future__ import annotations

import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from speechclas import batch
from speechclas.rundir import RunDir
from tests.conftest import DEMO_DATA, REPO

NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = REPO / "test-artifacts"
CELL_TIMEOUT_S = 300


def execute(name: str, workdir) -> nbformat.NotebookNode:
    """Run a notebook in `workdir`, keeping the executed copy in test-artifacts/ (also when a cell
    fails: nbclient raises CellExecutionError naming the cell, and the copy shows the outputs before it)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})  # fmt: skip
    try:
        client.execute()
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        nbformat.write(notebook, ARTIFACTS / name)
    return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == kind]


def text_of(notebook: nbformat.NotebookNode) -> str:
    parts = [o.get("text", "") for o in outputs(notebook, "stream")]
    parts += [o.data.get("text/markdown", "") for o in outputs(notebook, "display_data")]
    return "\n".join(parts)


def images_in(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.data for o in outputs(notebook, "display_data"))


def test_dataset_exploration_runs_on_the_demo_data(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEECHCLAS_NB_DATA_DIR", str(DEMO_DATA))
    monkeypatch.setenv("SPEECHCLAS_NB_MAX_CLIPS", "120")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = execute("1.0-Dataset_exploration.ipynb", tmp_path)
    text = text_of(notebook)
    assert f"data: {DEMO_DATA}" in text
    assert "| folder | class | training | validation | testing | speakers |" in text
    assert "| bed | _unknown_ |" in text
    assert "120 clips: duration" in text
    assert images_in(notebook) >= 5  # split bars, histograms, examples, before and after augmentation


def test_prediction_statistics_makes_and_shows_the_test_split_predictions(monkeypatch, tmp_path, trained_run):
    models_dir = tmp_path / "models"
    shutil.copytree(trained_run.root, models_dir / trained_run.name)
    monkeypatch.setenv("SPEECHCLAS_NB_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("SPEECHCLAS_NB_RUN", trained_run.name)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = execute("3.1-Prediction_statistics.ipynb", tmp_path)

    run = RunDir(models_dir / trained_run.name)
    _, metrics = batch.load_batch(run, "test")  # made by the notebook through speechclas.batch
    text = text_of(notebook)
    assert f"run {trained_run.name}, batch 'test'" in text
    assert f"accuracy {metrics['accuracy']:.3f} on {metrics['count']} labelled clips" in text
    assert "| class | precision | recall | F1 | support |" in text
    assert "most often predicted instead" in text
    assert images_in(notebook) >= 2  # confusion matrix, confidence (and mistakes, if any)


@pytest.mark.parametrize("name", ["1.0-Dataset_exploration.ipynb", "3.1-Prediction_statistics.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
