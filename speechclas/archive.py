"""Unpack a user-supplied dataset archive (.tar, .tar.gz/.tgz, .zip) without trusting it.

An archive can name files outside the folder it is unpacked into (``../x``,
``/etc/x``), smuggle links or device files, or expand to far more data than
its size suggests. ``extract_archive`` checks every member before writing
anything, unpacks into a temporary sibling folder, and only then moves the
result into place, so a refused archive leaves nothing in the target folder.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from speechclas.fetch import UrlPolicy, fetch_url, redact_url

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_BYTES = 4 * 2**30
DEFAULT_MAX_MEMBERS = 500_000
SUPPORTED = ".tar, .tar.gz/.tgz or .zip"
_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
_CHUNK_BYTES = 1024 * 1024
# What a damaged archive raises while being read (gzip.BadGzipFile is an OSError).
_CORRUPT = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)
# Raised by the tar "data" filter (Python 3.12, 3.11.4+); our own checks should come first.
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
_IGNORED_TOP_LEVEL = re.compile(r"^(\..*|__MACOSX)$")  # dotfiles and macOS zip debris


class ArchiveError(ValueError):
    """An archive that cannot or may not be unpacked; the message says which and why."""


class TooManyFiles(ArchiveError):
    """An archive holding more regular files than its caller's ``max_files``."""


def _format_name(name: str) -> str | None:
    """The archive format a file name promises, for error messages."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            return ".tar.gz" if suffix == ".tgz" else suffix
    return None


def _detect(archive: Path) -> str:
    """``"tar"`` or ``"zip"`` from the file's content; the name is only used to word errors.

    Tar is tried first: a tar whose last member is a zip file can look like a
    zip from its tail, whereas a zip never passes the tar header checksum.
    """
    if archive.stat().st_size == 0:
        raise ArchiveError(f"{archive.name} is empty (0 bytes), not an archive")
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
        if zipfile.is_zipfile(archive):
            return "zip"
    except (OSError, *_CORRUPT):
        pass
    promised = _format_name(archive.name)
    if promised:
        raise ArchiveError(
            f"{archive.name} is not a valid {promised} archive (corrupt or truncated?)"
        )
    raise ArchiveError(f"{archive.name} is not a supported archive: expected a {SUPPORTED} file")


def _member_path(name: str, archive_name: str) -> PurePosixPath | None:
    """The member's safe relative path, None for the archive root itself (``./``)."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise ArchiveError(
            f"{archive_name}: member {name!r} has an absolute path; refusing to unpack"
        )
    parts = [part for part in normalized.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"{archive_name}: member {name!r} contains '..' and would escape the target folder; "
            "refusing to unpack"
        )
    return PurePosixPath(*parts) if parts else None


def _check_inside(root: Path, relative: PurePosixPath, name: str, archive_name: str) -> None:
    """Belt and braces after ``_member_path``: the resolved destination must stay under root."""
    if not (root / relative).resolve().is_relative_to(root.resolve()):
        raise ArchiveError(
            f"{archive_name}: member {name!r} would be written outside the target folder"
        )


class _Budget:
    """Counts members and bytes against the caps, raising once one is exceeded."""

    def __init__(self, archive_name: str, max_total_bytes: int, max_members: int, max_files: int | None = None):
        self.archive_name = archive_name
        self.max_total_bytes = max_total_bytes
        self.max_members = max_members
        self.max_files = max_files
        self.members = 0
        self.bytes = 0
        self.files = 0

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveError(
                f"{self.archive_name} has more than {self.max_members} members; refusing to unpack"
            )

    def add_file(self) -> None:
        self.files += 1
        if self.max_files is not None and self.files > self.max_files:
            raise TooManyFiles(
                f"{self.archive_name} holds more than {self.max_files} files; refusing to unpack"
            )

    def add_bytes(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.max_total_bytes:
            raise ArchiveError(
                f"{self.archive_name} unpacks to more than {self.max_total_bytes} bytes; "
                "refusing to unpack"
            )


def _links_refused(archive_name: str, name: str, kind: str) -> ArchiveError:
    return ArchiveError(
        f"{archive_name}: member {name!r} is a {kind}; links are not allowed in dataset archives "
        "(only regular files and folders)"
    )


def _plan_tar(tar: tarfile.TarFile, staging: Path, budget: _Budget) -> list[tarfile.TarInfo]:
    """Validate every tar member (reading headers only) and return those to extract."""
    name = budget.archive_name
    planned = []
    for member in tar:  # iterate rather than getmembers() so the member cap bites early
        budget.add_member()
        relative = _member_path(member.name, name)
        if member.issym():
            raise _links_refused(name, member.name, f"symbolic link to {member.linkname!r}")
        if member.islnk():
            raise _links_refused(name, member.name, f"hard link to {member.linkname!r}")
        if member.ischr() or member.isblk() or member.isfifo():
            raise ArchiveError(
                f"{name}: member {member.name!r} is a device file or fifo; refusing to unpack"
            )
        if not (member.isreg() or member.isdir()):
            raise ArchiveError(
                f"{name}: member {member.name!r} has an unsupported type; refusing to unpack"
            )
        if relative is None:
            continue
        _check_inside(staging, relative, member.name, name)
        if member.isreg():
            budget.add_file()
            budget.add_bytes(member.size)
        planned.append(member)
    return planned


def _extract_tar(archive: Path, staging: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = _plan_tar(tar, staging, budget)
        if budget.files == 0:
            raise ArchiveError(f"{budget.archive_name} is empty: it contains no files")
        if hasattr(tarfile, "data_filter"):  # Python 3.12, 3.11.4+, 3.10.12+
            tar.extractall(staging, members=members, filter="data")
        else:
            for member in members:  # what the "data" filter would do for these members
                member.mode = 0o755 if member.isdir() else 0o644
                member.uid, member.gid = os.getuid(), os.getgid()
                member.uname = member.gname = ""
            tar.extractall(staging, members=members)


def _plan_zip(
    zf: zipfile.ZipFile, staging: Path, budget: _Budget
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Validate every zip entry (from the central directory) and return those to extract."""
    name = budget.archive_name
    planned = []
    for info in zf.infolist():
        budget.add_member()
        relative = _member_path(info.filename, name)
        mode = info.external_attr >> 16  # unix mode, when the zip was made on unix
        if stat.S_ISLNK(mode):
            raise _links_refused(name, info.filename, "symbolic link")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise ArchiveError(
                f"{name}: member {info.filename!r} is a device file or fifo; refusing to unpack"
            )
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{name}: member {info.filename!r} is encrypted; refusing to unpack")
        if relative is None:
            continue
        _check_inside(staging, relative, info.filename, name)
        if not info.is_dir():
            budget.add_file()
            budget.add_bytes(info.file_size)
        planned.append((info, relative))
    return planned


def _extract_zip(archive: Path, staging: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        planned = _plan_zip(zf, staging, budget)
        if budget.files == 0:
            raise ArchiveError(f"{budget.archive_name} is empty: it contains no files")
        # Written by hand, counting real bytes: the sizes in a zip's directory can lie.
        written = _Budget(budget.archive_name, budget.max_total_bytes, budget.max_members)
        for info, relative in planned:
            dest = staging / relative
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as out:
                for chunk in _zip_chunks(zf, info):
                    written.add_bytes(len(chunk))
                    out.write(chunk)


def _zip_chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """A member's bytes; read errors (e.g. bad offsets in a damaged zip) count as corruption."""
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK_BYTES):
                yield chunk
    except OSError as exc:
        raise zipfile.BadZipFile(str(exc)) from exc


def _clashes(staging: Path, target_dir: Path) -> list[Path]:
    """Paths in target_dir that unpacking would overwrite or that block a folder it needs."""
    clashes = []
    for path in staging.rglob("*"):
        dest = target_dir / path.relative_to(staging)
        if path.is_dir():
            if dest.exists() and not dest.is_dir():
                clashes.append(dest)
        elif dest.exists() or dest.is_symlink():
            clashes.append(dest)
    return clashes


def _move_into(staging: Path, target_dir: Path) -> None:
    """Move the unpacked tree into target_dir: one rename when it is new or empty, else a merge."""
    if not target_dir.is_symlink() and (
        not target_dir.exists() or (target_dir.is_dir() and not any(target_dir.iterdir()))
    ):
        os.replace(staging, target_dir)
        return
    if not target_dir.is_dir():
        raise ArchiveError(f"cannot unpack into {target_dir}: it is not a folder")
    clashes = _clashes(staging, target_dir)
    if clashes:
        raise ArchiveError(
            f"unpacking would overwrite {len(clashes)} existing path(s) in {target_dir}, "
            f"e.g. {clashes[0]}; refusing"
        )
    for path in sorted(staging.rglob("*")):
        dest = target_dir / path.relative_to(staging)
        if path.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            os.replace(path, dest)


def extract_archive(
    archive: Path,
    target_dir: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_files: int | None = None,
) -> list[Path]:
    """Unpack ``archive`` into ``target_dir`` and return the regular files written there.

    The format is detected from the content. Absolute or ``..`` member paths,
    links of any kind, device files, more than ``max_members`` members, more
    than ``max_files`` regular files (TooManyFiles) or more than
    ``max_total_bytes`` uncompressed are refused with ArchiveError before
    anything reaches ``target_dir``, as are damaged, empty or unknown archives
    and members that would overwrite existing files.
    """
    archive, target_dir = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist or is not a file")
    kind = _detect(archive)
    budget = _Budget(archive.name, max_total_bytes, max_members, max_files)
    parent = target_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # A sibling of target_dir: same file system, so moving the result is a rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.unpack-", dir=parent))
    try:
        try:
            (_extract_tar if kind == "tar" else _extract_zip)(archive, staging, budget)
        except ArchiveError:
            raise
        except _FILTER_ERRORS as exc:
            raise ArchiveError(f"{archive.name}: refused by the tar data filter: {exc}") from None
        except _CORRUPT as exc:
            promised = _format_name(archive.name) or ""
            expected = (
                ".zip" if kind == "zip" else (promised if promised.startswith(".tar") else ".tar")
            )
            raise ArchiveError(
                f"{archive.name} is not a valid {expected} archive (corrupt or truncated?): {exc}"
            ) from None
        except NotImplementedError as exc:  # e.g. a zip compression method Python lacks
            raise ArchiveError(f"{archive.name} uses an unsupported feature: {exc}") from None
        except OSError as exc:  # writing failed, e.g. no space left
            raise ArchiveError(
                f"could not unpack {archive.name} into {target_dir}: {exc}"
            ) from None
        unpacked = sorted(
            path.relative_to(staging) for path in staging.rglob("*") if path.is_file()
        )
        try:
            _move_into(staging, target_dir)
        except OSError as exc:
            raise ArchiveError(f"could not move unpacked files into {target_dir}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Unpacked %s into %s (%d files, %d bytes)",
        archive.name,
        target_dir,
        len(unpacked),
        budget.bytes,
    )
    return [target_dir / relative for relative in unpacked]


def _url_suffix(url: str) -> str:
    """The archive suffix of the URL's path, to name the temp file (the content still decides)."""
    path = urlsplit(url).path.lower()
    return next((suffix for suffix in _SUFFIXES if path.endswith(suffix)), "")


def _dataset_root(folder: Path) -> Path:
    """The folder holding the label folders: ``folder`` itself, or its only subfolder.

    Archives are often made from a single top folder (``speech/yes/...``);
    dotfiles and ``__MACOSX`` are ignored when deciding.
    """
    entries = [entry for entry in folder.iterdir() if not _IGNORED_TOP_LEVEL.match(entry.name)]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def download_and_extract(url: str, target_dir: Path, policy: UrlPolicy) -> Path:
    """Download the dataset archive at ``url`` into ``target_dir``; return the data folder.

    The return value is the folder that contains the label folders: ``target_dir``,
    or its only subfolder when the archive wraps everything in one top folder.
    ``policy.max_bytes`` bounds the download and, again, the unpacked files.
    Raises FetchError for download problems and ArchiveError for refused archives.
    """
    target_dir = Path(target_dir)
    parent = target_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # Next to the data rather than in /tmp, which is often small in containers.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=parent) as tmp:
        downloaded = fetch_url(url, tmp, progress=True, suffix=_url_suffix(url), **policy.kwargs())
        try:
            extract_archive(downloaded, target_dir, max_total_bytes=policy.max_bytes)
        except ArchiveError as exc:
            raise ArchiveError(
                f"the archive downloaded from {redact_url(url)} was refused: {exc}"
            ) from None
    return _dataset_root(target_dir)
