"""Writing files and folders safely: each appears whole or not at all, temporary names are unique and
created exclusively (never a fixed name that a symlink could stand in for), and a folder is replaced
only when featcache made it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class OutputError(ValueError):
    """An output that featcache will not write or replace; the message says why and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a new, exclusively created temporary file beside ``out``, then renamed over it."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; these files are read by others
        os.replace(tmp, out)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e, out.parent):
            raise disk_full_error(out) from None
        raise
    return out


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic: a reader never sees half a file, a crash never leaves one."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def temp_dir_beside(out: Path) -> Path:
    """A new, uniquely named folder beside ``out`` (same filesystem, so it can be renamed onto it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def check_replaceable(out: Path, ours: Callable[[Path], bool], what: str, overwrite: bool) -> None:
    """Refuse to write ``what`` at ``out`` unless it is absent or an empty folder, or it is one that
    featcache made (``ours``) and ``overwrite`` was given."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not out.is_dir() or out.is_symlink() or not ours(out):
        kind = "a file" if out.is_file() else "a folder" if out.is_dir() else "something"
        raise OutputError(f"{out} is {kind} that featcache did not make ({what} goes there); "
                          f"nothing was changed: choose another --out")
    if not overwrite:
        raise OutputError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another --out")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an existing one is moved aside first and removed only after the
    new one is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dir(out: str | os.PathLike, build: Callable[[Path], None], *, ours: Callable[[Path], bool], what: str,
              overwrite: bool) -> None:
    """``build(tmp)`` in a new temporary folder, installed as ``out`` when it returns, removed if it raises."""
    out = Path(out)
    with exclusive(out, what):
        check_replaceable(out, ours, what, overwrite)
        tmp = temp_dir_beside(out)
        try:
            build(tmp)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def is_disk_full(e: BaseException, folder: Path) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT anywhere in the chain, or (for libraries that report
    it as their own error, as torch.save and safetensors do) almost no space left where it was writing."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def disk_full_error(where: str | os.PathLike) -> OutputError:
    return OutputError(f"{where}: no space left on the device while writing it; free some space and run the same "
                       "command again (what was finished is kept)")


def lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def exclusive(out: str | os.PathLike, what: str) -> Iterator[None]:
    """One writer at a time for ``out``: an advisory lock on a hidden file beside it, held while the block
    runs and released when the process ends, however it ends (the kernel drops it). A second writer is
    refused with one line, before it touches anything."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file(out), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{out}: another featcache process is writing {what} there; wait for it to finish, "
                          "or choose another --out") from None
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
