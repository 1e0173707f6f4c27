"""speechclas.datasource: the data_url download cache, shared, atomic and bounded, against a real
local HTTP server, and the record a run keeps of its data folder."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from speechclas import datasource
from speechclas.archive import ArchiveError
from speechclas.config import load_config
from speechclas.datasource import DownloadCache, open_data_dir, resolve_data_dir, run_data_dir, write_record
from speechclas.fetch import FetchError, UrlPolicy
from speechclas.limits import Limits
from speechclas.rundir import create_run_dir
from tests.conftest import REPO
from tests.http_server import PROXY_VARS, drip, respond, serve_directory

ALLOW = Limits.from_env({"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1"})
POLICY = UrlPolicy.for_dataset(ALLOW)


@pytest.fixture(autouse=True)
def _direct_connections(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def dataset_tar(top: str = "speech", clip_bytes: int = 1000) -> bytes:
    """A .tar.gz of two label folders inside one top folder (random bytes: it does not compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("yes/a.wav", "no/b.wav"):
            data = os.urandom(clip_bytes)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class CountingSite:
    """A local server whose routes count their hits."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.routes: dict = {}
        self.hits: dict[str, int] = {}

    def add(self, path: str, route) -> str:
        def counted(handler):
            self.hits[path] = self.hits.get(path, 0) + 1
            route(handler)

        self.routes[path] = counted
        return f"{self.base}{path}"


@pytest.fixture
def site(tmp_path):
    site = CountingSite(tmp_path / "served")
    site.folder.mkdir()
    with serve_directory(site.folder, site.routes) as base:
        site.base = base
        yield site


def leftovers(downloads: Path) -> list[str]:
    """Everything in the cache folder but the lock files."""
    return sorted(p.name for p in downloads.iterdir() if p.name != ".locks") if downloads.exists() else []


def url_config(url: str, tmp_path: Path):
    return load_config({"data_url": url, "data_dir": str(tmp_path / "unused")})


# --- data_dir or data_url -------------------------------------------------------------


def test_without_a_url_the_data_dir_is_used(tmp_path):
    config = load_config({"data_dir": "data/demo"})
    with open_data_dir(config, tmp_path, Limits.defaults()) as source:
        assert source.data_dir == (tmp_path / "data" / "demo").resolve() and source.data_url is None
    assert not (tmp_path / "data" / "downloads").exists()


def test_a_url_is_downloaded_once_and_reused(site, tmp_path):
    url = site.add("/speech.tar.gz", respond(dataset_tar()))
    config = url_config(url, tmp_path)
    with open_data_dir(config, tmp_path, ALLOW) as source:
        first = source.data_dir
        assert source.data_url == url
    downloads = tmp_path / "data" / "downloads"
    assert downloads in first.parents and first.name == "speech"
    assert sorted(p.name for p in first.iterdir()) == ["no", "yes"]
    assert resolve_data_dir(config, tmp_path, ALLOW) == first
    assert site.hits == {"/speech.tar.gz": 1}
    assert leftovers(downloads) == [DownloadCache.key(url)]


def test_the_url_policy_applies(site, tmp_path):
    url = site.add("/speech.tar.gz", respond(dataset_tar()))
    with pytest.raises(FetchError, match="127.0.0.1 is a loopback address"):
        resolve_data_dir(url_config(url, tmp_path), tmp_path, Limits.defaults())
    assert site.hits == {} and leftovers(tmp_path / "data" / "downloads") == []


@pytest.mark.parametrize(
    ("route", "settings", "error", "expected"),
    [
        (respond(dataset_tar(clip_bytes=50_000)), {"SPEECHCLAS_DATA_URL_MAX_BYTES": "20000"}, FetchError,
         "larger than 20000 bytes"),
        (drip(10_000, 0.2), {"SPEECHCLAS_DATA_URL_DEADLINE_S": "1"}, FetchError, "longer than the 1 s allowed"),
        (respond(b"not an archive at all"), {}, ArchiveError, "refused"),
        (respond(dataset_tar()[:200], content_length=5000), {}, FetchError, "interrupted"),
    ],
    ids=["too-big", "slow-drip", "not-an-archive", "cut-short"],
)
def test_a_failed_download_leaves_nothing(site, tmp_path, route, settings, error, expected):
    url = site.add("/speech.tar.gz", route)
    limits = Limits.from_env({"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1", **settings})
    started = time.monotonic()
    with pytest.raises(error, match=expected):
        resolve_data_dir(url_config(url, tmp_path), tmp_path, limits)
    assert time.monotonic() - started < 20  # a hang bound
    assert leftovers(tmp_path / "data" / "downloads") == []


# --- sharing one download ------------------------------------------------------------


def test_two_threads_share_one_download(site, tmp_path):
    url = site.add("/speech.tar.gz", respond(dataset_tar(), delay=0.5))
    config = url_config(url, tmp_path)
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_data_dir(config, tmp_path, ALLOW))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert site.hits == {"/speech.tar.gz": 1}


RESOLVE_SCRIPT = """
import sys
from pathlib import Path
from speechclas.config import load_config
from speechclas.datasource import resolve_data_dir
from speechclas.limits import Limits
config = load_config({"data_url": sys.argv[1]})
print(resolve_data_dir(config, Path(sys.argv[2]), Limits.from_env()), flush=True)
"""


def resolve_in_process(url: str, base_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPEECHCLAS_ALLOW_PRIVATE_URLS": "1"}
    for var in PROXY_VARS:
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-c", RESOLVE_SCRIPT, url, str(base_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_share_one_download(site, tmp_path):
    url = site.add("/speech.tar.gz", respond(dataset_tar(), delay=1.0))
    processes = [resolve_in_process(url, tmp_path) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and Path(outputs[0][0].strip()).is_dir()
    assert site.hits == {"/speech.tar.gz": 1}


def test_a_killed_download_is_cleaned_up_at_the_next_start(site, tmp_path):
    good = dataset_tar()
    served = {"route": drip(100_000, 0.05)}
    url = site.add("/speech.tar.gz", lambda handler: served["route"](handler))
    downloads = tmp_path / "data" / "downloads"
    process = resolve_in_process(url, tmp_path)
    try:
        for _ in range(300):  # wait until bytes are arriving in the hidden partial folder
            if any(name.endswith(".tar.gz") for _, _, names in os.walk(downloads) for name in names):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the download never started")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    key = DownloadCache.key(url)
    assert [name.startswith(f".{key}.partial-") for name in leftovers(downloads)] == [True]

    served["route"] = respond(good)
    data_dir = resolve_data_dir(url_config(url, tmp_path), tmp_path, ALLOW)
    assert sorted(p.name for p in data_dir.iterdir()) == ["no", "yes"]
    assert leftovers(downloads) == [key]


# --- a bounded cache ------------------------------------------------------------------


def test_the_least_recently_used_download_is_removed_first(site, tmp_path):
    urls = {name: site.add(f"/{name}.tar.gz", respond(dataset_tar(name, clip_bytes=10_000)))
            for name in ("a", "b", "c")}
    cache = DownloadCache(tmp_path / "downloads", max_bytes=50_000)  # room for two of 20 kB

    def use(name):
        with cache.use(urls[name], POLICY) as data_dir:
            return data_dir

    use("a")
    use("b")
    use("a")  # a is now more recently used than b
    use("c")
    kept = {name for name in urls if (cache.folder / cache.key(urls[name])).is_dir()}
    assert kept == {"a", "c"}
    assert site.hits == {"/a.tar.gz": 1, "/b.tar.gz": 1, "/c.tar.gz": 1}


def test_a_download_in_use_is_never_removed(site, tmp_path):
    urls = {name: site.add(f"/{name}.tar.gz", respond(dataset_tar(name))) for name in ("a", "b", "c")}
    cache = DownloadCache(tmp_path / "downloads", max_bytes=0)
    with cache.use(urls["a"], POLICY) as in_use:
        with cache.use(urls["b"], POLICY):
            pass
        with cache.use(urls["c"], POLICY) as newest:
            assert in_use.is_dir() and newest.is_dir()  # b was the only one free to go
            assert not (cache.folder / cache.key(urls["b"])).exists()
    assert cache.evict() == [cache.key(urls["a"]), cache.key(urls["c"])]  # all free now, oldest first
    assert leftovers(cache.folder) == []


def test_leftovers_of_other_urls_are_swept_when_their_lock_is_free(tmp_path):
    cache = DownloadCache(tmp_path / "downloads", max_bytes=10**9)
    stale = cache.folder / ".0123456789abcdef.partial-x1"
    (stale / "data").mkdir(parents=True)
    cache.evict()
    assert leftovers(cache.folder) == []


def test_a_download_of_the_older_layout_is_replaced(site, tmp_path):
    """Before the cache: data/downloads/<key>/ and <key>.complete, no source.json."""
    url = site.add("/speech.tar.gz", respond(dataset_tar()))
    cache = DownloadCache(tmp_path / "downloads", max_bytes=10**9)
    old = cache.folder / cache.key(url)
    (old / "speech" / "yes").mkdir(parents=True)
    (cache.folder / f"{cache.key(url)}.complete").write_text(str(old / "speech"))
    with cache.use(url, POLICY) as data_dir:
        assert sorted(p.name for p in data_dir.iterdir()) == ["no", "yes"]
    assert leftovers(cache.folder) == [cache.key(url)] and site.hits == {"/speech.tar.gz": 1}


# --- the record in the run folder ------------------------------------------------------


def test_a_run_records_its_data_folder_and_old_runs_fall_back_to_conf_json(tmp_path):
    run = create_run_dir(tmp_path / "models")
    run.conf_path.write_text(json.dumps({"general": {"data_dir": "data/demo"}}))
    assert run_data_dir(run) == datasource.project_dir() / "data" / "demo"  # an older run
    source = datasource.DataSource(data_dir=tmp_path / "downloads" / "k" / "data", data_url="http://h/a.tgz")
    write_record(run, source, splits_dir=None)
    assert run_data_dir(run) == source.data_dir
    assert json.loads(run.data_source_path.read_text()) == {
        "data_dir": str(source.data_dir), "data_url": "http://h/a.tgz", "splits_from_files": False,
        "splits_dir": None,
    }


def test_credentials_of_a_url_are_not_recorded(site, tmp_path):
    url = site.add("/speech.tar.gz", respond(dataset_tar()))
    secret = url.replace("http://", "http://user:hunter2@")
    with open_data_dir(url_config(secret, tmp_path), tmp_path, ALLOW) as source:
        assert source.data_url == url
    records = [p.read_text() for p in (tmp_path / "data" / "downloads").rglob("source.json")]
    assert records and all("hunter2" not in text for text in records)
