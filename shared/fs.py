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


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished folder `new` to `dest`; an old `dest` is removed only after the swap."""
    new, dest = Path(new), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    publish(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
