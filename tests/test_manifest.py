"""speechclas-detect --manifest: many recordings through a pool of spawned processes or a local
Ray, one JSON line each, the same detections as one process and as `detect_audio`, bad files
as error lines, and a job that resumes where it stopped.

The recordings are short streams (5 to 9 s) of the detection run's held-out keywords, made as
tests/test_detect.py makes its streams. Every run of the CLI starts real worker processes,
which import TensorFlow and load the run: a few seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from speechclas import detect
from speechclas.audio import AudioLimits
from speechclas.cli import detect_main
from speechclas.detect import CLI_MAX_SECONDS, DetectSettings
from tests.http_server import serve_directory
from tests.test_detect import held_out_keywords, keyword_stream, recognised, write_wav

THRESHOLD = "0.7"  # as the CLI test of test_detect.py: the calibrated one (~0.98) keeps few words of a small model
SCORE_TOLERANCE = 1e-3  # one TensorFlow thread in a worker against the test process's pool


@pytest.fixture(scope="module")
def run(detection_run):
    return detection_run


@pytest.fixture(scope="module")
def scorer(run):
    return detect.load_scorer(run)


@pytest.fixture(scope="module")
def recordings(run, scorer, tmp_path_factory) -> Path:
    """A folder of four keyword streams (one in a sub-folder), a text file named .wav, and
    a manifest naming them, a missing file, a URL of one and an s3:// URL."""
    folder = tmp_path_factory.mktemp("recordings")
    (folder / "sub").mkdir()
    words = recognised(scorer, held_out_keywords(run), 3)
    for index, (name, chosen) in enumerate([("a.wav", [0, 1]), ("b.wav", [1, 2]), ("sub/c.wav", [2, 0]),
                                            ("d.wav", [0, 1, 2])]):  # fmt: skip
        stream, _ = keyword_stream([words[i] for i in chosen], seed=index)
        write_wav(folder / name, stream)
    (folder / "notes.wav").write_text("not audio")
    return folder


@pytest.fixture(scope="module")
def served(recordings, tmp_path_factory):
    """The recordings on a loopback HTTP server (private URLs allowed, for the workers too), and
    the manifest of every kind of line, with a comment and a blank line."""
    with pytest.MonkeyPatch.context() as env, serve_directory(recordings) as base:
        env.setenv("SPEECHCLAS_ALLOW_PRIVATE_URLS", "1")
        manifest = recordings / "files.txt"
        manifest.write_text("\n".join(["# recordings of the test", "a.wav", str(recordings / "b.wav"), "",
                                       "sub/c.wav", f"{base}/d.wav", "notes.wav", "gone.wav",
                                       "s3://bucket/e.wav", "a.wav"]) + "\n")  # fmt: skip
        yield manifest


def arguments(run, manifest: Path, out: Path, *more: str) -> list[str]:
    return ["--manifest", str(manifest), "--out", str(out), "--models-dir", str(run.root.parent),
            "--run", run.name, "--threshold", THRESHOLD, "--no-progress", *more]  # fmt: skip


def detect_manifest(capsys, *argv: str) -> tuple[dict, list[dict]]:
    """(summary printed, lines of --out) of a successful job."""
    assert detect_main(list(argv)) == 0
    summary = json.loads(capsys.readouterr().out)
    return summary, read_lines(Path(summary["out"]))


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def by_file(lines: list[dict]) -> dict[str, dict]:
    files = [line["file"] for line in lines]
    assert len(files) == len(set(files)), files  # each file once
    return {line["file"]: line for line in lines}


def assert_same_detections(found: list[dict], expected: list[dict]) -> None:
    assert [(d["label"], d["start_s"], d["end_s"]) for d in found] == [
        (d["label"], d["start_s"], d["end_s"]) for d in expected
    ]
    assert [d["score"] for d in found] == pytest.approx([d["score"] for d in expected], abs=SCORE_TOLERANCE)


@pytest.fixture(scope="module")
def one_process(run, served, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The served manifest's lines from one worker process (--jobs 1), for the other engines to match."""
    out = tmp_path_factory.mktemp("one") / "results.jsonl"
    assert detect_main(arguments(run, served, out, "--jobs", "1")) == 0
    return out, by_file(read_lines(out))


def test_two_workers_answer_as_one_process_and_as_detect_audio(run, scorer, served, recordings, one_process,
                                                               tmp_path, capsys):  # fmt: skip
    summary, lines = detect_manifest(capsys, *arguments(run, served, tmp_path / "results.jsonl", "--jobs", "2"))
    assert summary["files"] == 7 and summary["done"] == 7 and summary["skipped"] == 0  # a.wav is listed twice
    assert summary["errors"] == 3 and summary["detections"] > 0
    two, one = by_file(lines), one_process[1]
    url = next(name for name in two if name.startswith("http://"))
    absolute = str(recordings / "b.wav")
    assert set(two) == set(one) == {"a.wav", absolute, "sub/c.wav", url, "notes.wav", "gone.wav", "s3://bucket/e.wav"}
    assert sum(len(two[name]["detections"]) for name in two if "error" not in two[name]) == summary["detections"]

    for name, path in [("a.wav", "a.wav"), (absolute, "b.wav"), ("sub/c.wav", "sub/c.wav"), (url, "d.wav")]:
        assert two[name]["run"] == one[name]["run"] == run.name
        assert two[name]["settings"] == one[name]["settings"] and two[name]["settings"]["threshold"] == 0.7
        assert two[name]["duration_s"] == one[name]["duration_s"]
        direct = detect.detect_audio(scorer, recordings / path, DetectSettings(**two[name]["settings"]),
                                     AudioLimits.from_limits().with_max_seconds(CLI_MAX_SECONDS))  # fmt: skip
        assert two[name]["duration_s"] == direct["duration_s"]
        assert_same_detections(two[name]["detections"], direct["detections"])
        assert_same_detections(one[name]["detections"], direct["detections"])
    assert any(two[name]["detections"] for name in two if "error" not in two[name])

    assert "'notes.wav' is not a readable audio file" in two["notes.wav"]["error"]
    assert "cannot read the file 'gone.wav': No such file or directory" == two["gone.wav"]["error"]
    assert "only http(s) URLs and file paths" in two["s3://bucket/e.wav"]["error"]
    for name in ("notes.wav", "gone.wav", "s3://bucket/e.wav"):
        assert set(two[name]) == {"file", "error"} and two[name] == one[name]


def ray_processes() -> list[psutil.Process]:
    names = {"raylet", "gcs_server", "plasma_store"}
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if process.info["name"] in names or any("ray::" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_local_ray_answers_as_one_process(run, served, one_process, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a cluster of the environment is never used by accident
    before = {process.pid for process in ray_processes()}
    summary, lines = detect_manifest(capsys, *arguments(run, served, tmp_path / "results.jsonl",
                                                        "--engine", "ray", "--jobs", "2"))  # fmt: skip
    assert summary["done"] == 7 and summary["errors"] == 3
    found, one = by_file(lines), one_process[1]
    assert set(found) == set(one)
    for name, line in found.items():
        if "error" in line:
            assert line == one[name]
        else:
            assert line["settings"] == one[name]["settings"] and line["duration_s"] == one[name]["duration_s"]
            assert_same_detections(line["detections"], one[name]["detections"])
    assert not ray.is_initialized()
    left = [process for process in ray_processes() if process.pid not in before]
    gone, alive = psutil.wait_procs(left, timeout=20)
    assert not alive, [process.info for process in alive]


def test_a_job_run_again_goes_on_where_it_stopped(run, recordings, tmp_path, capsys):
    folder = tmp_path / "job"
    folder.mkdir()
    for name in ("a.wav", "b.wav", "d.wav"):
        (folder / name).write_bytes((recordings / name).read_bytes())
    manifest, out = folder / "files.txt", folder / "results.jsonl"
    manifest.write_text("a.wav\nb.wav\n")
    summary, first = detect_manifest(capsys, *arguments(run, manifest, out, "--jobs", "1"))
    assert (summary["done"], summary["skipped"], summary["errors"]) == (2, 0, 0)

    # Two more files; a.wav is no longer audio (detected again, it would be an error line);
    # the job stopped while writing b.wav's line.
    manifest.write_text("a.wav\nb.wav\nd.wav\nbroken.wav\n")
    (folder / "broken.wav").write_text("not audio either")
    (folder / "a.wav").write_text("overwritten")
    text = out.read_text()
    out.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + '{"file": "b.wav", "run": "20')
    summary, second = detect_manifest(capsys, *arguments(run, manifest, out, "--jobs", "1"))
    assert (summary["done"], summary["skipped"], summary["errors"]) == (3, 1, 1)
    lines = by_file(second)
    assert set(lines) == {"a.wav", "b.wav", "d.wav", "broken.wav"}
    assert lines["a.wav"] == first[0] and lines["b.wav"]["detections"] == first[1]["detections"]
    assert "not a readable audio file" in lines["broken.wav"]["error"]

    # Errors are kept unless asked again; then the file's one line is its new answer.
    assert detect_manifest(capsys, *arguments(run, manifest, out))[0]["done"] == 0  # no worker started
    (folder / "broken.wav").write_bytes((recordings / "d.wav").read_bytes())
    summary, third = detect_manifest(capsys, *arguments(run, manifest, out, "--jobs", "1", "--retry-errors"))
    assert (summary["done"], summary["skipped"], summary["errors"]) == (1, 3, 0)
    lines = by_file(third)
    assert len(third) == 4 and lines["broken.wav"]["detections"] == lines["d.wav"]["detections"]
    assert lines["a.wav"] == first[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["one.wav", "--manifest", "files.txt", "--out", "results.jsonl"], "not both"),
        (["one.wav", "--out", "results.jsonl"], "--out: only with --manifest"),
        (["--manifest", "files.txt"], "--manifest needs --out"),
        ([], "give an AUDIO file or URL, or --manifest"),
    ],
)
def test_a_job_asked_wrongly_is_refused_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        detect_main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_job_that_cannot_start_is_refused_before_any_work(run, tmp_path, caplog, capsys):
    out = tmp_path / "results.jsonl"
    assert detect_main(arguments(run, tmp_path / "missing.txt", out)) == 2
    assert f"cannot read the manifest {tmp_path / 'missing.txt'}: No such file or directory" in caplog.text
    manifest = tmp_path / "files.txt"
    manifest.write_text("a.wav\n")
    assert detect_main([*arguments(run, manifest, out), "--hop-ms", "15"]) == 2
    assert "hop_ms 15 is not a multiple of the model's frame stride of 10 ms" in caplog.text
    assert detect_main(["--manifest", str(manifest), "--out", str(out), "--models-dir", str(tmp_path)]) == 2
    assert "no trained model yet" in caplog.text
    assert detect_main([*arguments(run, manifest, out), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in caplog.text
    assert not out.exists() and capsys.readouterr().out == ""
