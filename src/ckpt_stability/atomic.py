"""Atomic outputs: everything is written under a temporary sibling name and renamed into place only
once complete, so a killed job never leaves a file or directory that looks finished.

Temporary names are ``.{name}.{pid}.{random}.tmp``; the next writer of the same target removes those
whose process is gone. Within ``publishing_only_while(check)``, each output is renamed into place only
once ``check`` has passed: the evaluation engine, which outlives its jobs, writes nothing for a job that
is gone."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

_publish_check: ContextVar[Callable[[Path], None] | None] = ContextVar("publish_check", default=None)


@contextlib.contextmanager
def publishing_only_while(check: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, ``check(target)`` runs before each output is renamed into place; it raises to stop
    the output from appearing."""
    token = _publish_check.set(check)
    try:
        yield
    finally:
        _publish_check.reset(token)


def _before_publishing(target: Path) -> None:
    check = _publish_check.get()
    if check is not None:
        check(target)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _remove_stale(target: Path) -> None:
    """Remove what killed writers of ``target`` left behind (their process is gone), so that reruns
    after crashes do not pile up partial files."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = leftover.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""a full disk, an exhausted quota, a file size limit"""


@contextlib.contextmanager
def _name_the_output_when_full(target: Path) -> Iterator[None]:
    """Make a no-room error name ``target``: ``os.pwrite`` and pyarrow name no file, ``shutil.copyfile``
    names its source, and the message would not say which output could not be written."""
    try:
        yield
    except OSError as error:
        if error.errno not in _NO_ROOM:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(target)) from error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _name_the_output_when_full(target):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            _before_publishing(target)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    An existing ``target`` is only replaced when the block succeeded: it is moved aside first and
    removed after the rename, so at every moment ``target`` is either the old or the new directory."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _name_the_output_when_full(target):
            yield tmp
            for entry in tmp.iterdir():
                if entry.is_file():
                    with open(entry, "rb") as handle:
                        os.fsync(handle.fileno())
            _before_publishing(target)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            if old is not None:
                shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
