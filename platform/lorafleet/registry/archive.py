"""The adapter archive format, both ways.

- The **stored** format (``pack_adapter_archive`` / ``unpack_adapter_archive``): a version's two PEFT files as
  one deterministic uncompressed ustar archive (sorted names, mtime 0, owner 0), so the same folder content
  always has the same sha256 in the object store.
- The **upload** format (``unpack_import_archive``, ``archive_kind``): safe unpacking of an uploaded PEFT
  adapter archive (.tar, .tar.gz/.tgz, .zip) before it is imported.

An archive is untrusted input: this module never calls ``extractall``. Each entry is checked before its bytes
are read (relative name without ``..``, at most one folder deep, a regular file or folder, not a pickle file,
within the entry-count and byte caps) and then copied by this code into a new file, so links, devices and
escapes out of the destination cannot happen. A gzip stream is cut off at the byte cap (no decompression
bombs). The archive's kind is read from its bytes, not its name.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Protocol

from lorafleet.errors import AdapterFormatError, PayloadTooLargeError, UnsafeFormatError, ValidationError
from lorafleet.registry.peft_format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterFiles

#: entries (files and folders) an archive may hold; a PEFT folder has two to four files
DEFAULT_MAX_ARCHIVE_MEMBERS = 32
_CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
ARCHIVE_MEMBERS = (CONFIG_FILE, WEIGHTS_FILE)
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def unpack_import_archive(
    archive: Path, dest: Path, *, max_bytes: int, max_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS
) -> Path:
    """Unpack a .tar, .tar.gz/.tgz or .zip archive into ``dest`` (created; must not exist) and return the PEFT
    folder in it: ``dest`` itself when ``adapter_config.json`` is at the top, else the one sub-folder holding it.

    The kind is read from the bytes, not the name. Only regular files and folders are accepted, at most one
    folder deep, with relative names without ``..``; pickle files are refused by name before any byte is
    written. At most ``max_members`` entries and ``max_bytes`` unpacked bytes (a gzip stream is cut off
    there too). On any refusal ``dest`` is removed again.
    """
    if max_bytes < 1 or max_members < 1:
        raise ValidationError("max_bytes and max_members must be >= 1")
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise ValidationError(f"{dest} already exists; unpack into a new folder")
    budget = _Budget(max_bytes=max_bytes, max_members=max_members)
    kind = _archive_kind(archive)
    dest.mkdir(parents=True)
    try:
        if kind == "zip":
            _extract_zip(archive, dest, budget)
        else:
            _extract_tar(archive, dest, budget, gz=kind == "tar.gz")
        return _peft_folder(dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


class _Budget:
    """Counts entries and declared bytes; refuses the entry that goes over either cap."""

    def __init__(self, *, max_bytes: int, max_members: int) -> None:
        self.max_bytes, self.max_members = max_bytes, max_members
        self.members = self.bytes = 0
        self.seen: set[PurePosixPath] = set()

    @property
    def stream_limit(self) -> int:
        """Bytes a tar stream may take: the data plus generous room for headers and end-of-archive padding."""
        return self.max_bytes + (self.max_members + 16) * 64 * 1024

    def admit(self, name: str, path: PurePosixPath | None, size: int) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise PayloadTooLargeError(f"archive holds more than {self.max_members} entries")
        self.bytes += max(size, 0)
        if self.bytes > self.max_bytes:
            raise PayloadTooLargeError(f"archive unpacks to more than {self.max_bytes} bytes (at {name!r})")
        if path is not None:
            if path in self.seen:
                raise AdapterFormatError(f"archive holds {name!r} twice")
            self.seen.add(path)


def archive_kind(head: bytes) -> str | None:
    """``zip``, ``tar.gz`` or ``tar`` from an archive's first 512 bytes (its magic numbers), else None."""
    if head[:4] in _ZIP_MAGIC:
        return "zip"
    if head[:2] == _GZIP_MAGIC:
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _archive_kind(archive: Path) -> str:
    if not archive.is_file():
        raise AdapterFormatError(f"{archive} is not a file")
    with archive.open("rb") as f:
        kind = archive_kind(f.read(512))
    if kind is None:
        raise AdapterFormatError(f"{archive.name} is not a .tar, .tar.gz/.tgz or .zip archive")
    return kind


def _member_path(name: str, *, is_dir: bool) -> PurePosixPath | None:
    """A member's safe relative path (None for the archive's own top folder, ``./``), or a refusal."""
    if not name or "\x00" in name or "\\" in name:
        raise AdapterFormatError(f"archive member {name!r} has an unsupported name")
    if name.startswith("/") or _DRIVE.match(name):
        raise AdapterFormatError(f"archive member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdapterFormatError(f"archive member {name!r} points outside the archive (..)")
    if not parts:
        if not is_dir:
            raise AdapterFormatError(f"archive member {name!r} has no file name")
        return None
    if len(parts) > (1 if is_dir else 2):
        raise AdapterFormatError(
            f"archive member {name!r} is nested too deep: the PEFT files must be at the top or in one folder"
        )
    if not is_dir and PurePosixPath(parts[-1]).suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(
            f"refusing pickle-based archive member {name!r}: only safetensors adapters are accepted"
        )
    return PurePosixPath(*parts)


def _extract_tar(archive: Path, dest: Path, budget: _Budget, *, gz: bool) -> None:
    """One streaming pass: each header is checked (and counted) before its data is read."""
    with archive.open("rb") as raw:
        stream: _Readable = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        limited = _LimitedReader(stream, limit=budget.stream_limit)
        try:
            with tarfile.open(fileobj=limited, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    path = _tar_member_path(member)
                    budget.admit(member.name, path, member.size if member.isreg() else 0)
                    if path is None:
                        continue
                    if member.isdir():
                        _make_dir(dest, path, member.name)
                        continue
                    data = tar.extractfile(member)
                    if data is None:
                        raise AdapterFormatError(f"archive member {member.name!r} is not a regular file")
                    _write_file(dest, path, member.name, data, member.size)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise AdapterFormatError(f"{archive.name} cannot be read as a tar archive ({exc})") from exc


def _tar_member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    if member.issym() or member.islnk():
        raise AdapterFormatError(f"archive member {member.name!r} is a link; only regular files are accepted")
    if not (member.isdir() or member.isreg()) or member.issparse():
        raise AdapterFormatError(
            f"archive member {member.name!r} is a device, pipe or special file; only regular files are accepted"
        )
    return _member_path(member.name, is_dir=member.isdir())


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    """Every entry of the central directory is checked before any file is written."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            paths = [_zip_member_path(info, budget) for info in infos]
            for info, path in zip(infos, paths, strict=True):
                if path is None:
                    continue
                if info.is_dir():
                    _make_dir(dest, path, info.filename)
                    continue
                with zf.open(info) as data:
                    _write_file(dest, path, info.filename, data, info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise AdapterFormatError(f"{archive.name} cannot be read as a zip archive ({exc})") from exc


def _zip_member_path(info: zipfile.ZipInfo, budget: _Budget) -> PurePosixPath | None:
    # the file type the archiver recorded in the Unix mode; 0 when it recorded none (Python's
    # ``ZipFile.writestr`` keeps only permission bits, 0o600): then the entry is what its name says
    kind = stat.S_IFMT(info.external_attr >> 16)
    if stat.S_ISLNK(kind):
        raise AdapterFormatError(
            f"archive member {info.filename!r} is a link; only regular files are accepted"
        )
    if kind and not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        raise AdapterFormatError(
            f"archive member {info.filename!r} is a device, pipe or special file; only regular files are accepted"
        )
    if info.flag_bits & 0x1:
        raise AdapterFormatError(f"archive member {info.filename!r} is encrypted")
    path = _member_path(info.filename, is_dir=info.is_dir())
    budget.admit(info.filename, path, 0 if info.is_dir() else info.file_size)
    return path


def _make_dir(dest: Path, path: PurePosixPath, name: str) -> None:
    try:
        (dest / path).mkdir(exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise AdapterFormatError(f"archive member {name!r} conflicts with another entry") from exc


def _write_file(dest: Path, path: PurePosixPath, name: str, data: _Readable, size: int) -> None:
    """Copy at most ``size`` bytes into a new file (never over an existing one, never through a link). A
    ``.safetensors`` member's header is checked first, before any of its data is written: a large member that
    is not safetensors (zeros, say) is refused after reading a few bytes, not after unpacking all of it."""
    target = dest / path
    head = b""
    if path.suffix == ".safetensors":
        head = _safetensors_head(name, data, size)
    try:
        target.parent.mkdir(exist_ok=True)
        with target.open("xb") as out:
            out.write(head)
            copied = len(head)
            while chunk := data.read(min(_CHUNK, size - copied + 1)):
                copied += len(chunk)
                if copied > size:
                    raise AdapterFormatError(f"archive member {name!r} holds more bytes than it declares")
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise AdapterFormatError(f"archive member {name!r} conflicts with another entry") from exc


#: the largest safetensors JSON header accepted (safetensors' own limit is 100 MB; an adapter's is a few KB)
_MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024


def _safetensors_head(name: str, data: _Readable, size: int) -> bytes:
    """Read and check a safetensors member's length prefix and JSON header: the header fits the member, parses
    as a JSON object, and its tensors end exactly where the member does. Returns the bytes read."""
    prefix = _read_exactly(data, 8, name)
    length = int.from_bytes(prefix, "little")
    if not 2 <= length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
        raise AdapterFormatError(
            f"archive member {name!r} is not a safetensors file (header length {length})"
        )
    header = _read_exactly(data, length, name)
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFormatError(
            f"archive member {name!r} is not a safetensors file (header is not JSON)"
        ) from None
    if not isinstance(parsed, dict):
        raise AdapterFormatError(
            f"archive member {name!r} is not a safetensors file (header is not an object)"
        )
    ends = [
        t["data_offsets"][1]
        for key, t in parsed.items()
        if key != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
    ]
    if 8 + length + max(ends, default=0) != size:
        raise AdapterFormatError(
            f"archive member {name!r} is not a safetensors file (its tensors do not end where the file does)"
        )
    return prefix + header


def _read_exactly(data: _Readable, n: int, name: str) -> bytes:
    out = b""
    while len(out) < n and (chunk := data.read(n - len(out))):
        out += chunk
    if len(out) < n:
        raise AdapterFormatError(f"archive member {name!r} ends before its safetensors header does")
    return out


def _peft_folder(root: Path) -> Path:
    if (root / CONFIG_FILE).is_file():
        return root
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if not found:
        raise AdapterFormatError(f"the archive holds no {CONFIG_FILE} at its top or in a sub-folder")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise AdapterFormatError(f"the archive holds {len(found)} adapter folders ({names}); import one")
    return found[0]


class _LimitedReader:
    """A read-only stream that refuses to deliver more than ``limit`` bytes (a gzip bomb stops here)."""

    def __init__(self, stream: _Readable, *, limit: int) -> None:
        self._stream, self._left = stream, limit

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        chunk = self._stream.read(want)
        self._left -= len(chunk)
        if self._left < 0:
            raise PayloadTooLargeError("archive unpacks to more bytes than the import cap allows")
        return chunk


__all__ = ["DEFAULT_MAX_ARCHIVE_MEMBERS", "archive_kind", "unpack_import_archive"]


# --- the stored format ----------------------------------------------------------------------------------
def pack_adapter_archive(*, files: AdapterFiles, dest: Path) -> Path:
    """Write the two PEFT files as an uncompressed ustar archive with sorted names, mtime 0 and owner 0,
    so the same folder content always yields the same bytes (and the same sha256)."""
    with tarfile.open(dest, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(ARCHIVE_MEMBERS):
            path = files.directory / name
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, f)
    return dest


def unpack_adapter_archive(*, archive: Path, dest_dir: Path) -> None:
    """Extract exactly the two expected regular files (no paths, links or extras), each atomically."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            _extract_members(tar, dest_dir)
    except tarfile.TarError as exc:
        raise AdapterFormatError(f"adapter archive cannot be read ({exc})") from exc


def _extract_members(tar: tarfile.TarFile, dest_dir: Path) -> None:
    members = tar.getmembers()
    names = [m.name for m in members]
    if sorted(names) != sorted(ARCHIVE_MEMBERS) or not all(m.isreg() for m in members):
        raise AdapterFormatError(f"adapter archive holds unexpected entries {names!r}")
    for member in members:
        source = tar.extractfile(member)
        if source is None:
            raise AdapterFormatError(f"adapter archive entry {member.name!r} is not a file")
        partial = dest_dir / f".{member.name}.partial"
        with source, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(partial, dest_dir / member.name)
