"""A job's scratch folder that says who owns it, and the sweep that removes those whose owner is gone.

``owned_tempdir("lorafleet-job-12-")`` is a ``tempfile.TemporaryDirectory`` named
``lorafleet-job-12-pid<pid>-<random>`` holding an exclusive ``flock`` on the ``.owner`` file inside it for as long
as the folder lives. A process killed with ``kill -9`` never removes its folder, but the kernel drops its lock,
so ``remove_stale_tempdirs`` (run when a service or trainer starts) can tell a dead owner's folder from a live
one without guessing from ages: it takes the lock itself, and a folder whose lock it gets is removed. A folder
whose ``.owner`` is missing (its owner died between making the folder and locking it) is removed only when the
pid in its name is not running. Folders of other users and names without a pid (made by an earlier version) are
left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: the scratch folders the sweep looks at (train jobs, and imports: jobs and the CLI's)
SWEPT_PREFIXES = ("lorafleet-job-", "lorafleet-import-", "lorafleet-export-")
OWNER_FILE = ".owner"
_PID = re.compile(r"-pid(\d+)-")


@contextlib.contextmanager
def owned_tempdir(prefix: str, *, dir: Path | None = None) -> Iterator[Path]:
    """A new folder ``<prefix>pid<pid>-<random>`` under ``dir`` (default: the temp dir), locked by this process
    until the block ends, then removed (as ``tempfile.TemporaryDirectory`` does; the lock is let go after)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}pid{os.getpid()}-", dir=dir))
    fd: int | None = None
    try:
        fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:  # left for the next sweep (the lock goes with this process's descriptor)
            logger.warning("could not remove %s: %s", folder, exc)
        if fd is not None:
            os.close(fd)


def remove_stale_tempdirs(
    root: Path | None = None, *, prefixes: Sequence[str] = SWEPT_PREFIXES
) -> list[Path]:
    """Remove the ``owned_tempdir`` folders under ``root`` (default: the temp dir) whose owner is gone; the
    folders removed. Never one a running process holds; errors on one folder are logged and skipped."""
    root = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return removed
    for folder in entries:
        if not folder.name.startswith(tuple(prefixes)) or _PID.search(folder.name) is None:
            continue
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            if _remove_if_stale(folder):
                removed.append(folder)
        except OSError as exc:
            logger.warning("could not clean up %s: %s", folder, exc)
    if removed:
        logger.info(
            "removed %d scratch folder(s) left by processes that died: %s",
            len(removed),
            ", ".join(f.name for f in removed),
        )
    return removed


def _remove_if_stale(folder: Path) -> bool:
    try:
        fd = os.open(folder / OWNER_FILE, os.O_RDWR)
    except FileNotFoundError:
        # made, then its owner died before the lock was taken (or it is being made right now): the pid decides
        match = _PID.search(folder.name)
        if match is None or _running(int(match.group(1))):
            return False
        shutil.rmtree(folder)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False  # its owner is alive
            raise
        shutil.rmtree(folder)  # holding the dead owner's lock: no one else removes or reuses it meanwhile
        return True
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


__all__ = ["OWNER_FILE", "SWEPT_PREFIXES", "owned_tempdir", "remove_stale_tempdirs"]
