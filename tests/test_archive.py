"""speechclas.archive with real archives built on the fly, and a real local HTTP server."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile

import pytest

from speechclas.archive import ArchiveError, download_and_extract, extract_archive
from speechclas.fetch import FetchError, UrlPolicy
from speechclas.limits import Limits
from tests.http_server import PROXY_VARS, serve_directory

DATASET = {"yes/a.wav": b"RIFF-yes", "no/b.wav": b"RIFF-no", "no/c.wav": b"RIFF-no-2"}
LOOPBACK_ALLOWED = UrlPolicy(max_bytes=2**20, allow_private=True)


@pytest.fixture(autouse=True)
def _direct_connections(monkeypatch):
    """Talk to 127.0.0.1 directly even if the machine has a proxy configured."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def make_tar(path, files, *, mode="w:gz", extra=()):
    """A tar of ``files`` (name -> bytes) plus ``extra`` ready-made TarInfo headers (no data)."""
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def make_zip(path, files, *, extra=()):
    """A zip of ``files`` (name -> bytes) plus ``extra`` (ZipInfo, bytes) entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def make_archive(kind, path, files):
    return make_tar(path, files) if kind == "tar.gz" else make_zip(path, files)


def tar_link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def assert_nothing_left(tmp_path, target):
    """A refused archive leaves no target, no staging folder and no stray file."""
    assert not target.exists() or list(target.iterdir()) == []
    leftovers = sorted(
        p.name for p in tmp_path.iterdir() if p.name not in {"archives", target.name}
    )
    assert leftovers == []


@pytest.fixture
def archives(tmp_path):
    folder = tmp_path / "archives"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_good_archive_extracts(tmp_path, archives, kind):
    archive = make_archive(kind, archives / f"data.{kind}", DATASET)
    target = tmp_path / "target"
    files = extract_archive(archive, target)
    assert files == sorted(target / name for name in DATASET)
    for name, data in DATASET.items():
        assert (target / name).read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "target"]  # no staging left


def test_plain_tar_and_misleading_name(tmp_path, archives):
    """The format comes from the content: a plain tar called .zip still unpacks."""
    archive = make_tar(archives / "data.zip", DATASET, mode="w")
    assert len(extract_archive(archive, tmp_path / "target")) == len(DATASET)


def test_merges_into_existing_folder_without_overwriting(tmp_path, archives):
    target = tmp_path / "target"
    (target / "yes").mkdir(parents=True)
    (target / "yes" / "old.wav").write_bytes(b"old")
    files = extract_archive(make_zip(archives / "d.zip", DATASET), target)
    assert files == sorted(target / name for name in DATASET)  # only what was unpacked
    assert (target / "yes" / "old.wav").read_bytes() == b"old"

    with pytest.raises(ArchiveError, match="would overwrite 1 existing path"):
        extract_archive(
            make_zip(archives / "e.zip", {"yes/old.wav": b"new", "yes/z.wav": b"z"}), target
        )
    assert (target / "yes" / "old.wav").read_bytes() == b"old"
    assert not (target / "yes" / "z.wav").exists()


def test_target_may_be_a_symlink_to_a_folder(tmp_path, archives):
    real = tmp_path / "real"
    real.mkdir()
    target = tmp_path / "target"
    target.symlink_to(real)
    extract_archive(make_zip(archives / "d.zip", DATASET), target)
    assert target.is_symlink() and (real / "yes" / "a.wav").read_bytes() == b"RIFF-yes"


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../evil.wav", "contains '..'"),
        ("yes/../../evil.wav", "contains '..'"),
        ("..\\evil.wav", "contains '..'"),
        ("/tmp/evil.wav", "absolute path"),
        ("C:/evil.wav", "absolute path"),
    ],
)
def test_escaping_member_refused(tmp_path, archives, kind, name, expected):
    archive = make_archive(kind, archives / f"bad.{kind}", {"yes/a.wav": b"ok", name: b"evil"})
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=expected):
        extract_archive(archive, target)
    assert not (tmp_path / "evil.wav").exists()
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        (tar_link("yes/passwd", "../../../etc/passwd"), "symbolic link to '../../../etc/passwd'"),
        (tar_link("yes/inside", "a.wav"), "symbolic link to 'a.wav'"),  # every link is refused
        (tar_link("yes/hard", "yes/a.wav", tarfile.LNKTYPE), "hard link"),
        (tar_link("yes/fifo", "", tarfile.FIFOTYPE), "device file or fifo"),
        (tar_link("yes/dev", "", tarfile.CHRTYPE), "device file or fifo"),
    ],
)
def test_tar_links_and_devices_refused(tmp_path, archives, link, expected):
    archive = make_tar(archives / "links.tar.gz", {"yes/a.wav": b"ok"}, extra=[link])
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=expected) as info:
        extract_archive(archive, target)
    if "link" in expected:
        assert "links are not allowed" in str(info.value)
    assert_nothing_left(tmp_path, target)


def test_zip_symlink_refused(tmp_path, archives):
    link = zipfile.ZipInfo("yes/passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(archives / "links.zip", {"yes/a.wav": b"ok"}, extra=[(link, "/etc/passwd")])
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match="symbolic link; links are not allowed"):
        extract_archive(archive, target)
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_size_cap(tmp_path, archives, kind):
    archive = make_archive(
        kind, archives / f"big.{kind}", {"a.wav": b"x" * 600, "b.wav": b"y" * 600}
    )
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match="unpacks to more than 1000 bytes"):
        extract_archive(archive, target, max_total_bytes=1000)
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_member_cap(tmp_path, archives, kind):
    archive = make_archive(kind, archives / f"many.{kind}", {f"{i}.wav": b"x" for i in range(5)})
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match="more than 4 members"):
        extract_archive(archive, target, max_members=4)
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_truncated_archive(tmp_path, archives, kind):
    whole = make_archive(kind, archives / f"whole.{kind}", {"yes/a.wav": os.urandom(50_000)})
    archive = archives / f"cut.{kind}"
    archive.write_bytes(whole.read_bytes()[:25_000])
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=r"cut\.\S+ is not a valid \.(tar|zip)"):
        extract_archive(archive, target)
    assert_nothing_left(tmp_path, target)


def test_damaged_zip_member(tmp_path, archives):
    whole = make_zip(archives / "whole.zip", {"yes/a.wav": os.urandom(5000)})
    damaged = bytearray(whole.read_bytes())
    damaged[100:200] = bytes(100)  # inside the compressed data of the only member
    archive = archives / "damaged.zip"
    archive.write_bytes(damaged)
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=r"damaged\.zip is not a valid \.zip archive"):
        extract_archive(archive, target)
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("noise.tar.gz", r"noise\.tar\.gz is not a valid \.tar\.gz archive"),
        ("noise.tgz", r"noise\.tgz is not a valid \.tar\.gz archive"),
        ("noise.zip", r"noise\.zip is not a valid \.zip archive"),
        (
            "noise.bin",
            r"noise\.bin is not a supported archive: expected a \.tar, \.tar\.gz/\.tgz or \.zip",
        ),
    ],
)
def test_random_bytes(tmp_path, archives, name, expected):
    archive = archives / name
    archive.write_bytes(os.urandom(4096))
    with pytest.raises(ArchiveError, match=expected):
        extract_archive(archive, tmp_path / "target")
    assert_nothing_left(tmp_path, tmp_path / "target")


def test_zero_byte_file(tmp_path, archives):
    archive = archives / "data.zip"
    archive.touch()
    with pytest.raises(ArchiveError, match="is empty"):
        extract_archive(archive, tmp_path / "target")


def test_missing_file(tmp_path):
    with pytest.raises(ArchiveError, match="does not exist"):
        extract_archive(tmp_path / "nope.zip", tmp_path / "target")


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_empty_archive(tmp_path, archives, kind):
    archive = make_archive(kind, archives / f"empty.{kind}", {})
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match="is empty: it contains no files"):
        extract_archive(archive, target)
    assert_nothing_left(tmp_path, target)


def test_error_is_a_value_error():
    assert issubclass(ArchiveError, ValueError)


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    with serve_directory(folder) as base:
        yield folder, base


def test_download_and_extract_single_top_folder(tmp_path, served):
    folder, base = served
    make_tar(folder / "speech.tar.gz", {f"speech/{name}": data for name, data in DATASET.items()})
    target = tmp_path / "data" / "dataset"
    root = download_and_extract(f"{base}/speech.tar.gz", target, LOOPBACK_ALLOWED)
    assert root == target / "speech"
    assert sorted(p.name for p in root.iterdir()) == ["no", "yes"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset"]  # download removed


def test_download_and_extract_flat(tmp_path, served):
    folder, base = served
    make_zip(folder / "speech.zip", DATASET)
    target = tmp_path / "dataset"
    assert download_and_extract(f"{base}/speech.zip", target, LOOPBACK_ALLOWED) == target
    assert (target / "yes" / "a.wav").read_bytes() == b"RIFF-yes"


def test_download_and_extract_follows_operator_setting(tmp_path, served):
    folder, base = served
    make_zip(folder / "speech.zip", DATASET)
    refused = UrlPolicy.for_dataset(Limits.from_env({}))
    with pytest.raises(FetchError, match="loopback"):
        download_and_extract(f"{base}/speech.zip", tmp_path / "refused", refused)
    assert not (tmp_path / "refused").exists()
    allowed = UrlPolicy.for_dataset(Limits.from_env({"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1"}))
    assert download_and_extract(f"{base}/speech.zip", tmp_path / "allowed", allowed) == tmp_path / "allowed"


def test_download_and_extract_bounds_the_unpacked_size_too(tmp_path, served):
    folder, base = served
    make_tar(folder / "bomb.tar.gz", {"yes/zeros.wav": bytes(200_000)})  # compresses to a few hundred bytes
    assert (folder / "bomb.tar.gz").stat().st_size < 10_000
    with pytest.raises(ArchiveError, match="unpacks to more than 10000 bytes"):
        download_and_extract(f"{base}/bomb.tar.gz", tmp_path / "data" / "dataset",
                             UrlPolicy(max_bytes=10_000, allow_private=True))
    assert list((tmp_path / "data").iterdir()) == []


def test_download_and_extract_refuses_bad_archive(tmp_path, served):
    folder, base = served
    make_tar(folder / "evil.tar.gz", {"../evil.wav": b"evil"})
    target = tmp_path / "data" / "dataset"
    with pytest.raises(
        ArchiveError, match=f"downloaded from {base}/evil.tar.gz was refused: .*'..'"
    ):
        download_and_extract(f"{base}/evil.tar.gz", target, LOOPBACK_ALLOWED)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_and_extract_missing(tmp_path, served):
    _, base = served
    with pytest.raises(FetchError, match="HTTP 404"):
        download_and_extract(f"{base}/none.zip", tmp_path / "dataset", LOOPBACK_ALLOWED)
