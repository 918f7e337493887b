"""Atomic, permission-correct writes: a result appears whole or not at all.

Files are written to a temporary name in the destination folder and renamed into place;
temporary files and folders get the permissions a plain `open` / `mkdir` would have given
(tempfile creates them private).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Give `tmp` ordinary permissions and rename it to `dest` (same filesystem)."""
    tmp = Path(tmp)
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
    os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix or dest.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(dest: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` (and the folders themselves) to disk."""
    path = Path(path)
    for p in sorted(path.rglob("*"), reverse=True) + [path]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where the
    system cannot (another OS, an old kernel or a filesystem without it); nothing is changed then."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished folder `new` to `dest`, its contents flushed to disk first.

    An existing `dest` is swapped with `new` in one atomic step where the system allows it, so
    `dest` always exists (old or new, never missing or half-written); the old contents are removed
    after the swap. Elsewhere the old folder is renamed aside first (a moment without `dest`).
    """
    new, dest = Path(new), Path(dest)
    fsync_tree(new)
    os.chmod(new, 0o777 & ~_umask())
    if dest.exists():
        if exchange(new, dest):  # `new` now holds the old contents
            _fsync_dir(dest.parent)
            shutil.rmtree(new, ignore_errors=True)
            return
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        publish(new, dest)
        _fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    publish(new, dest)
    _fsync_dir(dest.parent)
