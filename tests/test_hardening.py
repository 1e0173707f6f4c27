"""Issue 8, "Must show": a bad-input corpus against a real ``deepaas-run --workers 1``.

One server serves the corpus, started as the Docker image starts it: one
worker, ``--client-max-size`` from `Limits.client_max_size`, and a TMPDIR of
its own. Each case is sent with a 10 s client timeout and must get its 4xx
with a message (or a 2xx where the input is legitimate). Over the corpus the
memory of deepaas-run and its workers (RSS of the process tree, sampled) must
grow by less than 300 MB; afterwards a good request answers 200, no temp file
is left and no run folder was added. The slow-drip URL needs private URLs
allowed and a short deadline, so it gets a server of its own; so does
Schemathesis, whose trainings are confined to a temporary data root and
capped to a few steps.

``test-artifacts/hardening_corpus.md`` receives the table of every case
(status, time, message) and the memory figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import soundfile
import soxr

from speechclas.limits import Limits
from tests.conftest import DEMO_DATA, REPO, demo_clip, make_project_home, wav_bytes
from tests.http_server import redirect, serve_directory
from tests.processes import deepaas_command, free_port, running, wait_until_serving

MODEL = "/v2/models/speechclas/"
PREDICT = MODEL + "predict/"
TRAIN = MODEL + "train/"
MiB = 2**20
CASE_TIMEOUT_S = 10  # the bound for every case
WARM_TIMEOUT_S = 120  # the first prediction waits for the worker to import TensorFlow
MAX_AUDIO_BYTES = 8 * MiB  # room for the 60 000-member zip (5.4 MiB) below the upload limit
MEMORY_GROWTH_LIMIT = 300 * 10**6
MEMORY_SAMPLE_S = 0.2
ARTIFACT = REPO / "test-artifacts" / "hardening_corpus.md"
COMMAND = "PYTHONPATH=$PWD python -m pytest -q tests/test_hardening.py"
TINY_WORDS = ("yes", "no", "up")


# --- servers -------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    url: str
    home: Path
    tmp: Path  # the server's TMPDIR
    log: Path
    process: psutil.Process
    client_max_size: int  # --client-max-size it was started with
    outside: Path  # a folder outside every operator root, for paths a training must not reach


def make_server_home(root: Path, runs) -> Path:
    """A SPEECHCLAS_HOME serving copies of `runs`, with a tmp/ for TMPDIR and a folder `outside` beside it.

    Its data/ holds an empty audios/ (a training of the defaults that gets past validation fails
    fast for lack of clips), tiny/ (three words of the demo data) and a link to /etc (to check
    that links are followed).
    """
    home = make_project_home(root / "home", runs)
    (home / "tmp").mkdir()
    (home / "data" / "audios").mkdir(parents=True)
    (home / "data" / "etc-link").symlink_to("/etc")
    for word in TINY_WORDS:
        shutil.copytree(DEMO_DATA / word, home / "data" / "tiny" / word)
    (root / "outside").mkdir()
    return home


@contextlib.contextmanager
def deepaas_server(home: Path, **settings: str):
    """deepaas-run --workers 1 with --client-max-size from the operator's Limits, warmed up by one prediction."""
    env = {
        **os.environ,
        "SPEECHCLAS_HOME": str(home),
        "TMPDIR": str(home / "tmp"),  # to see what requests leave behind
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **settings,
    }
    port = free_port()
    client_max_size = Limits.from_env(env).client_max_size()
    command = deepaas_command(port, workers=1) + ["--client-max-size", str(client_max_size)]
    log = home / "deepaas.log"
    with running(command, env, home, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        server = Server(url=url, home=home, tmp=home / "tmp", log=log, process=psutil.Process(process.pid),
                        client_max_size=client_max_size, outside=home.parent / "outside")  # fmt: skip
        warm = predict(server, files=upload(), timeout=WARM_TIMEOUT_S)
        assert warm.status_code == 200, f"the warm-up prediction failed: {warm.status_code} {warm.text}"
        yield server


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (deepaas-run, its workers, their children)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += member.memory_info().rss
    return total


class MemoryWatch:
    """Samples `tree_rss` in a thread: the baseline, the peak and the last value.

    Paused while a training the corpus accepts on purpose runs: that is no bad input, and its
    process (TensorFlow, a few hundred MB) is the training tests' to measure. Whatever it leaves
    behind is counted once sampling resumes.
    """

    def __init__(self, process: psutil.Process):
        self.process = process
        self.baseline = tree_rss(process)
        self.peak = self.baseline
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            with contextlib.suppress(psutil.NoSuchProcess):
                if not self._paused.is_set():
                    self.peak = max(self.peak, tree_rss(self.process))

    @contextlib.contextmanager
    def paused(self):
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        last = tree_rss(self.process)
        self.peak = max(self.peak, last)
        return last


@dataclasses.dataclass
class Corpus:
    server: Server
    memory: MemoryWatch
    rows: list[dict]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, trained_run):
    # The detect upload bound as the clip's, so the body limit (and the oversized bodies sent) is 9 MiB, not 129.
    settings = {"SPEECHCLAS_MAX_AUDIO_BYTES": str(MAX_AUDIO_BYTES), "SPEECHCLAS_DETECT_MAX_AUDIO_BYTES": str(MAX_AUDIO_BYTES)}
    home = make_server_home(tmp_path_factory.mktemp("hardening"), [trained_run])
    with deepaas_server(home, **settings) as server:
        # An archive too, so the baseline holds what a batch of clips loads once.
        warm = predict(server, files=upload(content=zip_bytes({"yes/a.wav": demo_clip().read_bytes()}),
                                            name="warm.zip"), timeout=WARM_TIMEOUT_S)  # fmt: skip
        assert warm.status_code == 200, warm.text
        watch = MemoryWatch(server.process)
        yield Corpus(server=server, memory=watch, rows=[])
        watch.stop()


# --- requests ------------------------------------------------------------------


def predict(server: Server, files=None, timeout: float = CASE_TIMEOUT_S, **fields) -> requests.Response:
    return requests.post(server.url + PREDICT, files=files, data=fields, timeout=timeout)


def upload(content: bytes | None = None, name: str = "clip.wav") -> dict:
    return {"data": (name, demo_clip().read_bytes() if content is None else content, "application/octet-stream")}


def start_training(server: Server, **params: str) -> requests.Response:
    return requests.post(server.url + TRAIN, params=params, timeout=CASE_TIMEOUT_S)


def answer_message(response: requests.Response) -> str:
    """The message a person reads: JSON ``message``, webargs' ``{field: [messages]}``, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    if isinstance(body, dict) and 400 <= response.status_code < 500:
        return "; ".join(f"{key}: {' '.join(map(str, value)) if isinstance(value, list) else value}"
                         for key, value in body.items())  # fmt: skip
    return json.dumps(body)[:300]


# --- inputs ----------------------------------------------------------------------


def riff_wav(channels: int, sample_rate: int, bits: int, data: bytes, declared_bytes: int | None = None) -> bytes:
    """A PCM wav written by hand, so its header can say what libsndfile would never write."""
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block_align, block_align, bits)
    size = len(data) if declared_bytes is None else declared_bytes
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 0xFFFFFFFF)) + body


def silent_flac(channels: int, sample_rate: int, seconds: int) -> bytes:
    """Silence compresses to almost nothing: a few hundred KB announce (and hold) an hour."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", sample_rate, channels, subtype="PCM_16", format="FLAC") as flac:
        block = np.zeros((sample_rate * 10, channels), dtype=np.int16)
        for _ in range(seconds // 10):
            flac.write(block)
    return buffer.getvalue()


def demo_samples() -> np.ndarray:
    samples, _ = soundfile.read(demo_clip(), dtype="float32")
    return samples


def float_wav(samples: np.ndarray, sample_rate: int = 16000) -> bytes:
    return wav_bytes(samples.astype(np.float32), sample_rate, subtype="FLOAT")


def with_nan() -> bytes:
    samples = demo_samples().copy()
    samples[len(samples) // 2] = np.nan
    return float_wav(samples)


def stereo_float_44k() -> bytes:
    """A legitimate clip in another shape: 2.5 s, 44.1 kHz, stereo float."""
    padded = np.pad(soxr.resample(demo_samples(), 16000, 44100), (22050, 22050))
    return float_wav(np.stack([padded, 0.5 * padded], axis=1), 44100)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def zip_of_empty_members(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index in range(count):
            archive.writestr(f"{index}.wav", b"")
    return buffer.getvalue()


def zip_bomb(unpacked_mib: int) -> bytes:
    """One member of zeros that deflates about 1000:1."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("yes/big.wav", "w", force_zip64=True) as member:
            block = bytes(MiB)
            for _ in range(unpacked_mib):
                member.write(block)
    return buffer.getvalue()


def tar_with_link_out() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        clip = demo_clip().read_bytes()
        info = tarfile.TarInfo("yes/a.wav")
        info.size = len(clip)
        archive.addfile(info, io.BytesIO(clip))
        link = tarfile.TarInfo("yes/passwd.wav")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


# --- the corpus ----------------------------------------------------------------------

FOUR_XX = frozenset(range(400, 500))
OK = frozenset({200})

Check = Callable[[requests.Response, Server], "str | None"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    group: str
    send: Callable[[Server], requests.Response]
    expect: frozenset[int]
    check: Check | None = None  # a further condition on the answer; returns what is wrong, or None

    def __str__(self) -> str:
        return self.name


def expected_text(statuses: frozenset[int]) -> str:
    if statuses == FOUR_XX:
        return "4xx"
    if FOUR_XX < statuses:
        return "4xx or " + "/".join(str(s) for s in sorted(statuses - FOUR_XX))
    return "/".join(str(s) for s in sorted(statuses))


def predicted(response: requests.Response, _server: Server) -> str | None:
    if response.status_code != 200:
        return None
    body = response.json()
    if body.get("status") != "ok" or len(body.get("predictions", [])) != 5:
        return f"a 200 without five predictions: {str(body)[:200]}"
    return None


def archive_answer(unscored: Callable[[dict], bool], reason: str) -> Check:
    """For an archive answered with 200: no member for which `unscored` holds may carry predictions."""

    def check(response: requests.Response, _server: Server) -> str | None:
        if response.status_code != 200:
            return None
        body = response.json()
        if body.get("status") != "ok" or not isinstance(body.get("files"), list):
            return f"a 200 that is not a per-file answer: {str(body)[:200]}"
        scored = [f["file"] for f in body["files"] if unscored(f) and f.get("predictions")]
        return f"{reason}: {scored}" if scored else None

    return check


def member_error(name: str) -> Check:
    """For an archive answered with 200: the member `name` is reported with an error, not left out."""

    def check(response: requests.Response, _server: Server) -> str | None:
        if response.status_code != 200:
            return None
        files = response.json().get("files", [])
        if any(f.get("file") == name and f.get("error") for f in files):
            return None
        return f"{name} is neither refused nor reported with an error: {[f.get('file') for f in files]}"

    return check


def every_file_scored(count: int) -> Check:
    def check(response: requests.Response, _server: Server) -> str | None:
        files = response.json().get("files", [])
        scored = [f for f in files if len(f.get("predictions", [])) == 5 and "error" not in f]
        return None if len(scored) == count == len(files) else f"expected {count} files scored: {files}"

    return check


def nothing_escaped(response: requests.Response, server: Server) -> str | None:
    escaped = [p for folder in (server.tmp, server.home, server.home.parent) for p in folder.glob("evil.wav")]
    return f"the archive wrote outside its folder: {escaped}" if escaped else None


def both(*checks: Check) -> Check:
    def check(response: requests.Response, server: Server) -> str | None:
        return next((problem for c in checks if (problem := c(response, server))), None)

    return check


LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


def no_resolved_address(url: str) -> Check:
    """A refusal must not tell the caller what internal address the name resolved to."""

    def check(response: requests.Response, _server: Server) -> str | None:
        message = answer_message(response)
        echoed = [a for a in LOOPBACK_ADDRESSES if a in message and a not in url]
        return f"the message echoes the resolved address {echoed}" if echoed else None

    return check


def names_parameter(*names: str) -> Check:
    def check(response: requests.Response, _server: Server) -> str | None:
        message = answer_message(response)
        return None if any(name in message for name in names) else f"the message names none of {names}"

    return check


def no_folder(path_of: Callable[[Server], Path]) -> Check:
    def check(response: requests.Response, server: Server) -> str | None:
        path = path_of(server)
        return f"{path} was created" if path.exists() else None

    return check


def _prediction_cases() -> list[Case]:
    def up(content: Callable[[], bytes], name: str = "clip.wav"):
        return lambda server: predict(server, files=upload(content(), name))

    cases = [
        # legitimate inputs
        Case("good_16k_clip", "legitimate", up(lambda: demo_clip().read_bytes()), OK, predicted),
        Case("good_44k_stereo_float_2.5s", "legitimate", up(stereo_float_44k), OK, predicted),
        Case("good_zip_of_two_clips", "legitimate",
             up(lambda: zip_bytes({"yes/a.wav": demo_clip().read_bytes(), "no/b.wav": demo_clip("no").read_bytes()}),
                "two.zip"),
             OK, every_file_scored(2)),
        # decode bombs
        Case("wav_8bit_1Hz_4kB_(1.1h)", "decode bomb", up(lambda: riff_wav(1, 1, 8, bytes([128]) * 4000)),
             frozenset({400})),
        Case("flac_8ch_10min_silence", "decode bomb", up(lambda: silent_flac(8, 16000, 600), "clip.flac"),
             frozenset({400})),
        Case("wav_64ch_0.1s", "decode bomb", up(lambda: riff_wav(64, 16000, 16, bytes(64 * 2 * 1600))),
             frozenset({400})),
        Case("flac_mono_1h_silence_180kB", "decode bomb", up(lambda: silent_flac(1, 16000, 3600), "clip.flac"),
             frozenset({400})),
        Case("wav_header_claims_35h", "decode bomb",
             up(lambda: riff_wav(1, 16000, 16, bytes(4000), declared_bytes=4_000_000_000)), frozenset({400})),
        Case("wav_rate_1MHz", "decode bomb", up(lambda: riff_wav(1, 1_000_000, 16, bytes(32000))),
             frozenset({400})),
        # samples and files that are not usable audio
        Case("float_wav_with_nan", "bad audio", up(with_nan), frozenset({400})),
        Case("float_wav_with_inf", "bad audio", up(lambda: float_wav(np.where(np.arange(16000) == 8000, np.inf, 0.1))),
             frozenset({400})),
        Case("float_wav_speech_times_1e30", "bad audio", up(lambda: float_wav(demo_samples() * 1e30)),
             FOUR_XX | OK, predicted),
        Case("float_wav_all_plus_1e30", "bad audio", up(lambda: float_wav(np.full(16000, 1e30))), FOUR_XX | OK,
             predicted),
        Case("float_wav_all_minus_1e30", "bad audio", up(lambda: float_wav(np.full(16000, -1e30))), FOUR_XX | OK,
             predicted),
        Case("truncated_wav", "bad audio", up(lambda: demo_clip().read_bytes()[:9000]), frozenset({400})),
        Case("header_only_wav", "bad audio", up(lambda: riff_wav(1, 16000, 16, b"")), frozenset({400})),
        Case("empty_file", "bad audio", up(lambda: b""), frozenset({400})),
        Case("not_audio", "bad audio", up(lambda: b"this is a text file, not audio\n" * 40), frozenset({400})),
        Case("both_data_and_urls", "bad request",
             lambda s: predict(s, files=upload(), urls="http://example.com/clip.wav"), frozenset({400})),
        Case("neither_data_nor_urls", "bad request", lambda s: predict(s), frozenset({400})),
        # body size
        Case("upload_over_client_max_size", "body size",
             lambda s: predict(s, files=upload(bytes(s.client_max_size + MiB))), frozenset({413})),
        Case("text_field_over_client_max_size", "body size",
             lambda s: predict(s, urls="http://example.com/" + "a" * (s.client_max_size + MiB)), frozenset({413})),
        Case("upload_just_over_max_audio_bytes", "body size", up(lambda: bytes(MAX_AUDIO_BYTES + 1)),
             frozenset({400, 413, 422})),
        # archives
        Case("zip_slip_../evil.wav", "archive",
             up(lambda: zip_bytes({"../evil.wav": demo_clip().read_bytes(), "yes/a.wav": demo_clip().read_bytes()}),
                "slip.zip"),
             FOUR_XX | OK, both(archive_answer(lambda f: "evil" in f["file"], "a member outside the archive was scored"),
                                nothing_escaped)),
        Case("zip_of_60000_members", "archive", up(lambda: zip_of_empty_members(60_000), "many.zip"), FOUR_XX),
        Case("zip_in_zip", "archive",
             up(lambda: zip_bytes({"inner.zip": zip_bytes({"yes/a.wav": demo_clip().read_bytes()}),
                                   "yes/b.wav": demo_clip().read_bytes()}), "nested.zip"),
             FOUR_XX | OK, both(archive_answer(lambda f: f["file"].startswith("inner.zip"), "the nested archive was unpacked"),
                                member_error("inner.zip"))),
        Case("zip_member_300MiB_of_zeros", "archive", up(lambda: zip_bomb(300), "bomb.zip"), FOUR_XX | OK,
             archive_answer(lambda f: "big.wav" in f["file"], "the bomb member was scored")),
        Case("zip_member_1Hz_wav", "archive",
             up(lambda: zip_bytes({"yes/bomb.wav": riff_wav(1, 1, 8, bytes([128]) * 4000),
                                   "yes/a.wav": demo_clip().read_bytes()}), "member.zip"),
             FOUR_XX | OK, archive_answer(lambda f: "bomb" in f["file"], "the 1 Hz member was scored")),
        Case("tar_with_link_to_/etc/passwd", "archive", up(tar_with_link_out, "link.tar.gz"), FOUR_XX | OK,
             archive_answer(lambda f: "passwd" in f["file"], "the link was followed")),
        # run names
        Case("run=../../etc", "run name", lambda s: predict(s, files=upload(), run="../../etc"),
             frozenset({400, 404})),
        Case("run=nonexistent", "run name", lambda s: predict(s, files=upload(), run="nonexistent"),
             frozenset({400, 404})),
        Case("run=2020-01-01_000000", "run name", lambda s: predict(s, files=upload(), run="2020-01-01_000000"),
             frozenset({400, 404})),
    ]  # fmt: skip
    return cases


SSRF_URLS = [
    "http://localhost/clip.wav",
    "http://127.0.0.1/clip.wav",
    "http://127.1/clip.wav",
    "http://[::1]/clip.wav",
    "http://[::ffff:127.0.0.1]/clip.wav",
    "http://2130706433/clip.wav",
    "http://0177.0.0.1/clip.wav",
    "http://0x7f000001/clip.wav",
    "http://0.0.0.0/clip.wav",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/clip.wav",
    "http://10.0.0.1/clip.wav",
    "file:///etc/passwd",
    "gopher://127.0.0.1:25/_HELO",
]


def _ssrf_cases() -> list[Case]:
    cases = [
        Case(f"urls={url}", "SSRF", lambda s, url=url: predict(s, urls=url), frozenset({400, 422}),
             no_resolved_address(url))
        for url in SSRF_URLS
    ]  # fmt: skip

    def via_redirect(server: Server) -> requests.Response:
        # No public server is reachable from here: a name that resolves to loopback is refused at the
        # first hop (test_fetch.py follows a redirect from a public-resolving name to a private one).
        routes = {"/redirect": redirect("http://169.254.169.254/latest/meta-data/")}
        with serve_directory(server.tmp.parent, routes) as base:
            return predict(server, urls=base.replace("127.0.0.1", "localhost") + "/redirect")

    cases.append(Case("urls=redirect_to_169.254.169.254", "SSRF", via_redirect, frozenset({400, 422}),
                      no_resolved_address("http://localhost/redirect")))  # fmt: skip
    return cases


TINY_TRAINING = {
    "data_dir": "data/tiny", "wanted_words": ",".join(TINY_WORDS), "model_architecture": "tiny_conv",
    "how_many_training_steps": "1", "learning_rate": "0.001", "batch_size": "10", "eval_step_interval": "1",
    "validation_percentage": "20", "testing_percentage": "20",
}  # fmt: skip


def _training_cases() -> list[Case]:
    def train(**params: str):
        return lambda server: start_training(server, **params)

    refused = frozenset({422})
    resources = ("clip_duration_ms", "sample_rate", "window_size_ms", "window_stride_ms", "feature")
    two_stages = {"learning_rate": "0.001,0.0001"}
    return [
        # models_dir is the operator's: refused, or not an argument at all (then the training goes to
        # models/, and the runner removes it). A real tiny training, so that the folder would be made.
        Case("models_dir=<outside>/x", "training",
             lambda s: start_training(s, models_dir=str(s.outside / "x"), **TINY_TRAINING), refused | frozenset({200}),
             no_folder(lambda s: s.outside / "x")),
        Case("data_dir=/etc", "training", train(data_dir="/etc"), refused, names_parameter("data_dir")),
        Case("data_dir=data/etc-link", "training", train(data_dir="data/etc-link"), refused,
             names_parameter("data_dir")),
        Case("data_dir=data/../../..", "training", train(data_dir="data/../../.."), refused,
             names_parameter("data_dir")),
        Case("data_splits_dir=/etc", "training", train(data_splits_dir="/etc"), refused,
             names_parameter("data_splits_dir")),
        Case("start_checkpoint=/etc/passwd", "training", train(start_checkpoint="/etc/passwd"), refused,
             names_parameter("start_checkpoint")),
        Case("start_checkpoint=models/../../../etc", "training", train(start_checkpoint="models/../../../etc"),
             refused, names_parameter("start_checkpoint")),
        Case("data_url=http://127.0.0.1/x.tgz", "training", train(data_url="http://127.0.0.1/x.tgz"), refused,
             both(names_parameter("data_url"), no_resolved_address("http://127.0.0.1/x.tgz"))),
        Case("data_url=http://localhost/x.tgz", "training", train(data_url="http://localhost/x.tgz"), refused,
             both(names_parameter("data_url"), no_resolved_address("http://localhost/x.tgz"))),
        Case("data_url=http://169.254.169.254/x.tgz", "training", train(data_url="http://169.254.169.254/x.tgz"),
             refused, names_parameter("data_url")),
        Case("data_url=file:///etc/passwd", "training", train(data_url="file:///etc/passwd"), refused,
             names_parameter("data_url")),
        Case("clip10s_48kHz_window1ms_stride1ms", "training",
             train(clip_duration_ms="10000", sample_rate="48000", window_size_ms="1", window_stride_ms="1"),
             refused, names_parameter(*resources)),
        Case("clip3s_stride1ms_(120k_feature_cells)", "training",
             train(clip_duration_ms="3000", window_stride_ms="1"), refused, names_parameter(*resources)),
        Case("wanted_words=yes%0Ano", "training", train(wanted_words="yes\nno"), refused,
             names_parameter("wanted_words")),
        Case("wanted_words=../x", "training", train(wanted_words="../x"), refused, names_parameter("wanted_words")),
        Case("wanted_words=yes,no/../../etc", "training", train(wanted_words="yes,no/../../etc"), refused,
             names_parameter("wanted_words")),
        Case("wanted_words=101_labels", "training", train(wanted_words=",".join(f"w{i}" for i in range(101))),
             refused, names_parameter("wanted_words")),
        Case("wanted_words=65_char_label", "training", train(wanted_words="yes," + "a" * 65), refused,
             names_parameter("wanted_words")),
        Case("how_many_training_steps=10000000", "training", train(how_many_training_steps="10000000"), refused,
             names_parameter("how_many_training_steps")),
        Case("how_many_training_steps=30000,30000", "training",
             train(how_many_training_steps="30000,30000", **two_stages), refused,
             names_parameter("how_many_training_steps")),
        Case("batch_size=4096", "training", train(batch_size="4096"), refused, names_parameter("batch_size")),
    ]  # fmt: skip


CASES = _prediction_cases() + _ssrf_cases() + _training_cases()


# --- running a case ----------------------------------------------------------------


def _wait_until_idle(server: Server) -> str:
    """After a case that got no answer: until the worker answers again, so one slow case does not fail the next."""
    started = time.monotonic()
    while time.monotonic() - started < 2 * WARM_TIMEOUT_S:
        with contextlib.suppress(requests.RequestException):
            if predict(server, files=upload(), timeout=WARM_TIMEOUT_S).status_code == 200:
                return f"the worker was busy for {time.monotonic() - started:.0f} s more"
    return "the worker never answered again"


def _end_training(server: Server, response: requests.Response, runs_before: set[Path] | None) -> str:
    """A training case that was accepted: wait for it to end (or cancel it), so that it frees the
    worker; with `runs_before`, remove the run folder it added to models/. Answers how it went."""
    uuid = response.json().get("uuid")
    status = "?"
    started = time.monotonic()
    while uuid and time.monotonic() - started < 60:
        status = requests.get(server.url + TRAIN + uuid, timeout=CASE_TIMEOUT_S).json().get("status")
        if status != "running":
            break
        time.sleep(0.5)
    else:
        with contextlib.suppress(requests.RequestException):
            requests.delete(server.url + TRAIN + str(uuid), timeout=60)
        status = f"still {status!r} after 60 s: cancelled"
    added = set((server.home / "models").iterdir()) - runs_before if runs_before is not None else set()
    for run in added:
        shutil.rmtree(run)
    removed = f", its run {sorted(p.name for p in added)} removed from models/" if added else ""
    return f"a training was started and ended {status!r}{removed}"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_case(case: Case, server: Server, memory: MemoryWatch | None = None) -> tuple[dict, list[str]]:
    """Send one case; its row for the table and what is wrong with the answer (empty: as expected)."""
    may_train = case.group == "training" and 200 in case.expect
    with memory.paused() if memory is not None and may_train else contextlib.nullcontext():
        return _send_and_judge(case, server)


def _send_and_judge(case: Case, server: Server) -> tuple[dict, list[str]]:
    runs_before = set((server.home / "models").iterdir())
    started = time.monotonic()
    response = None
    try:
        response = case.send(server)
        status, message = response.status_code, answer_message(response)
    except requests.Timeout:
        status, message = "timeout", f"no answer within {CASE_TIMEOUT_S} s"
    except requests.ConnectionError as exc:
        status, message = "no answer", f"connection failed: {exc}"
    # The exchange's time (requests' elapsed: from sending to the answer), not the making of the payload.
    seconds = response.elapsed.total_seconds() if response is not None else time.monotonic() - started
    problems = []
    if response is None:
        problems += [message, _wait_until_idle(server)]
    else:
        if response.status_code not in case.expect:
            problems.append(f"expected {expected_text(case.expect)}")
        elif seconds > CASE_TIMEOUT_S:
            problems.append(f"answered after {seconds:.1f} s, over the {CASE_TIMEOUT_S} s bound")
        elif 400 <= response.status_code < 500 and not message:
            problems.append("a 4xx without a message")
        if case.group == "training" and 200 <= response.status_code < 300:
            # Accepted on purpose: its run is removed so the next cases meet the same server. Accepted
            # by mistake: the run stays, for the final check and the log to show.
            ended = _end_training(server, response, runs_before if not problems else None)
            if problems:
                problems.append(ended)
        if case.check is not None and (problem := case.check(response, server)):
            problems.append(problem)
    row = {"case": case.name, "group": case.group, "expected": expected_text(case.expect), "status": status,
           "seconds": seconds, "ok": not problems, "message": message}  # fmt: skip
    return row, problems


def describe_failure(row: dict, problems: list[str]) -> str:
    return (
        f"{row['case']}: {'; '.join(problems)}\n"
        f"  answer: {row['status']} after {row['seconds']:.1f} s: {row['message'][:600]}"
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_corpus_case(corpus, case):
    row, problems = run_case(case, corpus.server, corpus.memory)
    corpus.rows.append(row)
    assert not problems, describe_failure(row, problems)


def test_slow_drip_url_is_refused_at_the_deadline(corpus, tmp_path, trained_run):
    """A URL whose server sends one byte every 2 s: the read timeout never fires, the total deadline must.

    Private URLs are allowed for this server only (the drip server is on loopback).
    """
    clip = demo_clip().read_bytes()

    def drip(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(clip)))
        handler.end_headers()
        with contextlib.suppress(OSError):
            for byte in clip[:30]:  # a minute at most, then the server hangs up
                handler.wfile.write(bytes([byte]))
                time.sleep(2)

    settings = {"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1", "SPEECHCLAS_URL_DEADLINE_S": "3"}
    with deepaas_server(make_server_home(tmp_path, [trained_run]), **settings) as server:
        with serve_directory(tmp_path, {"/drip.wav": drip}) as base:
            case = Case("urls=<slow drip, 1 byte / 2 s>", "slow drip",
                        lambda s: predict(s, urls=f"{base}/drip.wav"), frozenset({400}))  # fmt: skip
            row, problems = run_case(case, server)
        corpus.rows.append(row)
        left = sorted(p.name for p in server.tmp.iterdir())
    assert not problems, describe_failure(row, problems)
    assert left == [], f"the download left temp files: {left}"


def test_after_the_corpus_memory_is_bounded_and_nothing_is_left(corpus, trained_run):
    server = corpus.server
    last = corpus.memory.stop()
    good = predict(server, files=upload(), timeout=60)
    left = sorted(p.name for p in server.tmp.iterdir())
    runs = sorted(p.name for p in (server.home / "models").iterdir())
    memory = corpus.memory
    peak_growth, last_growth = memory.peak - memory.baseline, last - memory.baseline
    _write_table(corpus.rows, memory.baseline, peak_growth, last_growth)
    problems = []
    if good.status_code != 200:
        problems.append(f"a good request after the corpus answered {good.status_code}: {good.text[:300]}")
    if peak_growth >= MEMORY_GROWTH_LIMIT:
        problems.append(
            f"deepaas-run and its workers grew by {peak_growth / 1e6:.0f} MB at the peak "
            f"({memory.baseline / 1e6:.0f} MB before, {last_growth / 1e6:+.0f} MB at the end)"
        )
    if left:
        problems.append(f"{len(left)} temp files left in the server's TMPDIR: {left[:10]}")
    if runs != [trained_run.name]:
        problems.append(f"the corpus changed models/: {runs}")
    assert not problems, "\n".join(problems)


def _write_table(rows: list[dict], baseline: int, peak_growth: int, last_growth: int) -> None:
    failed = [row for row in rows if not row["ok"]]
    lines = [
        "# Hardening corpus (issue 8)",
        "",
        f"`{COMMAND}`: {len(rows)} cases, {len(rows) - len(failed)} as expected, {len(failed)} not.",
        f"Memory of deepaas-run and its workers (RSS of the process tree, sampled every {MEMORY_SAMPLE_S} s): "
        f"{baseline / 1e6:.0f} MB before the corpus, peak {peak_growth / 1e6:+.0f} MB, "
        f"end {last_growth / 1e6:+.0f} MB (limit +{MEMORY_GROWTH_LIMIT / 1e6:.0f} MB).",
        "",
        "| case | group | expected | status | time (s) | as expected | message |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{_markdown_cell(row['case'])}` | {row['group']} | {row['expected']} | {row['status']} | "
            f"{row['seconds']:.2f} | {'yes' if row['ok'] else '**no**'} | {_markdown_cell(row['message'][:90])} |"
        )
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- Schemathesis ------------------------------------------------------------------------

SCHEMATHESIS_OPERATIONS = (  # (method, path, examples): predict, metadata and train; train last
    ("GET", MODEL, 5),
    ("POST", PREDICT, 25),
    ("GET", TRAIN, 3),
    ("GET", TRAIN + "{uuid}", 5),
    ("DELETE", TRAIN + "{uuid}", 5),
    ("POST", TRAIN, 25),
)
SCHEMATHESIS_REQUEST_TIMEOUT_S = 20
SCHEMATHESIS_BUDGET_S = 75  # requests stop being sent after this; the test then reports the cut
TRAININGS_END_S = 90


def test_schemathesis_finds_no_server_error_and_no_hang(tmp_path, trained_run):
    """Examples generated from the live swagger.json (OpenAPI 2, from aiohttp-apispec): never a 5xx, never a hang.

    Trainings are confined to the temporary project's data/ (an empty audios/ and three demo words)
    and capped at 5 steps of 8 clips and 30 synthetic clips, so whatever Schemathesis gets accepted stays tiny; the
    operations run train last, since with one worker a training delays the predictions behind it.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.errors import FailureGroup

    home = make_server_home(tmp_path, [trained_run])
    limits = {
        "SPEECHCLAS_TRAIN_ROOTS": str(home / "data"),
        "SPEECHCLAS_MAX_TRAIN_STEPS": "5",
        "SPEECHCLAS_MAX_BATCH_SIZE": "8",
        "SPEECHCLAS_MAX_SYNTHETIC_CLIPS": "30",  # festival takes about 0.3 s a clip
        "SPEECHCLAS_MAX_AUDIO_BYTES": str(MiB),
    }
    failures: list[str] = []
    answers: dict[str, list[int]] = {}
    with deepaas_server(home, **limits) as server:
        schema = schemathesis.openapi.from_url(server.url + "/swagger.json")
        deadline = time.monotonic() + SCHEMATHESIS_BUDGET_S
        for method, path, examples in SCHEMATHESIS_OPERATIONS:
            answers[f"{method} {path}"] = []

            def call(case) -> None:
                if time.monotonic() > deadline:
                    return
                try:
                    response = case.call(base_url=server.url, timeout=SCHEMATHESIS_REQUEST_TIMEOUT_S)
                except requests.RequestException as exc:
                    failures.append(f"no answer ({type(exc).__name__}): {case.as_curl_command()}")
                    return
                answers[f"{case.method} {case.path}"].append(response.status_code)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except FailureGroup as exc:  # the check's own report (a BaseExceptionGroup)
                    failures.append(f"{exc}\n  {case.as_curl_command()}\n  {response.text[:300]}")

            explore = given(case=schema[path][method].as_strategy())(
                settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))(call)
            )  # fmt: skip
            explore()
        budget_left = deadline - time.monotonic()
        trainings = _wait_for_trainings(server)
        good = predict(server, files=upload(), timeout=60)
        runs = [p for p in (server.home / "models").iterdir() if p.name != trained_run.name]
    summary = "; ".join(f"{name}: {len(s)} requests, {sorted(set(s))}" for name, s in answers.items())
    print(f"Schemathesis: {summary}; {len(runs)} trainings ran")
    assert not failures, f"{len(failures)} failures ({summary}):\n" + "\n".join(failures[:10])
    assert budget_left > 0, f"Schemathesis ran out of its {SCHEMATHESIS_BUDGET_S} s ({summary})"
    assert trainings == [], f"trainings still running {TRAININGS_END_S} s after the last request: {trainings}"
    assert good.status_code == 200, f"a good request afterwards: {good.status_code} {good.text}"


def _wait_for_trainings(server: Server) -> list[dict]:
    """Until no training is running (bounded); answers those that still are."""
    started = time.monotonic()
    while True:
        running_now = [t for t in requests.get(server.url + TRAIN, timeout=10).json() if t.get("status") == "running"]
        if not running_now or time.monotonic() - started > TRAININGS_END_S:
            return running_now
        time.sleep(1)
