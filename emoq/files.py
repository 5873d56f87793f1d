"""Writing files and folders atomically: into a temporary sibling first, then renamed into place.

Everything emoq writes that a later run reads back (wavs, manifests, checkpoints, caches, exports,
evaluation results) goes through here, so a process killed mid-write (even by SIGKILL) leaves either the
previous complete version or nothing — never half a file that a rerun would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `path` to write by any means (a library that wants a file name);
    renamed to `path` when the block ends without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:  # mode 0o666 less the umask, like any new file (mkstemp's 0600 would make results private)
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """`open(path, mode)` whose content appears at `path` only once the block has finished writing it."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files ('w' or 'wb'), not mode {mode!r}")
    if mode == "w":
        open_kwargs = {"encoding": "utf-8", "newline": "\n", **open_kwargs}
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; when the block ends without an error it takes `path`'s place
    (an existing `path` is moved aside first, then deleted), otherwise it is deleted.

    `keep_existing`: a `path` that exists by then (a concurrent builder of the same content won) is kept and
    the new folder discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the finished folder private to this user
    try:
        yield tmp
        if not (keep_existing and path.exists()):
            swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder `tmp` at `path`: an existing `path` is moved aside to `.NAME.old` first, then
    deleted, so at every moment `path` is either the old complete folder or the new one (a `.NAME.old` left
    by an interrupted swap is removed by the next one)."""
    tmp, path = Path(tmp), Path(path)
    old = path.parent / f".{path.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def append_line_durably(handle, line: str) -> None:
    """Append one whole line to an open text file and put it on disk before the next is written: a kill or a
    crash loses at most the line being written, which readers of such files skip as torn."""
    handle.write(line)
    handle.flush()
    os.fsync(handle.fileno())
