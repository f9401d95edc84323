"""Writing files and folders safely: each appears whole or not at all, temporary names are unique and
created exclusively (never a fixed name that a symlink could stand in for), and a folder is replaced
only when featcache made it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from featcache.storage import Remote, StorageError, acquire_lock, is_unfinished, location, publish_dir


class OutputError(ValueError):
    """An output that featcache will not write or replace; the message says why and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a new, exclusively created temporary file beside ``out``, then renamed over it (on
    an object store: written locally, then put as one object)."""
    out = location(out)
    if isinstance(out, Remote):
        fd, tmp = tempfile.mkstemp(prefix="featcache-", suffix=out.suffix)
        os.close(fd)
        try:
            write(Path(tmp))
            out.put(Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)
        return out
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


def strict_json(obj: Any) -> str:
    """JSON that strict readers accept: a score that is not a number (no query to average) is ``null``,
    never the bare ``NaN`` or ``Infinity`` tokens Python's json module writes by default."""
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, strict_json(obj) + "\n")


_OURS_JSON = re.compile(rb'\{\s*"featcache_version"\s*:')


def write_user_json(out: str | os.PathLike, obj: dict[str, Any], *, what: str, overwrite: bool,
                    option: str = "--json") -> Path:
    """A JSON file the user named (``--json F``), as ``write_output`` writes one. ``obj`` carries
    ``featcache_version``; it is written as the first key, which marks the file as featcache's
    (``is_featcache_json``)."""
    record = {"featcache_version": obj["featcache_version"], **obj}
    return write_output(out, lambda tmp: tmp.write_text(strict_json(record) + "\n"), ours=is_featcache_json,
                        what=what, overwrite=overwrite, option=option)


def is_featcache_json(path: Path) -> bool:
    """A JSON file featcache wrote for a user (``--json FILE``): an object whose first key is
    ``featcache_version`` (read from the file's start: results of many queries can be large)."""
    try:
        with open(path, "rb") as f:
            return _OURS_JSON.match(f.read(256)) is not None
    except OSError:
        return False


def temp_dir_beside(out: Path | Remote) -> Path:
    """A new, uniquely named folder beside ``out`` (same filesystem, so it can be renamed onto it), with the
    permissions the user's umask gives a new folder (mkdtemp's 0700 is for secrets). For an output on an
    object store, a local temporary folder that :func:`install_dir` publishes."""
    if isinstance(out, Remote):
        return Path(tempfile.mkdtemp(prefix="featcache-"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _leftover(name: str) -> re.Pattern:
    """The names of what a killed writer of ``name`` leaves beside it: temporaries (``.NAME.XXXXXXXX.tmp``,
    tempfile's eight random characters) and a replaced folder moved aside (``.NAME.old.XXXXXXXX``)."""
    return re.compile(rf"\.{re.escape(name)}\.(?:[a-z0-9_]{{8}}\.tmp|old\.[a-z0-9_]{{8}})")


def clean_leftovers(out: Path) -> None:
    """Remove what killed writers of ``out`` left beside it (and, for a folder, its own temporaries inside).
    Called by the holder of ``out``'s lock: no live writer owns them. A folder moved aside just before a
    kill, with nothing put in its place, is moved back first."""
    pattern = _leftover(out.name)
    for entry in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        if not pattern.fullmatch(entry.name):
            continue
        if ".old." in entry.name and not out.exists() and (entry / out.name).is_dir():
            os.replace(entry / out.name, out)
        _remove(entry)
    if out.is_dir() and not out.is_symlink():
        for entry in out.iterdir():
            if _OWN_TEMPORARY.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)


# Temporaries of the files the holder of a run's lock writes inside it (eval.json is not among them: an
# evaluation writes it under its own lock, and may be running)
_OWN_TEMPORARY = re.compile(r"\.(?:config\.json|metrics\.jsonl|head\.safetensors|class_weights\.safetensors|state\.pt)"
                            r"\.[a-z0-9_]{8}\.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _refuse(out: Path, what: str, option: str) -> OutputError:
    kind = "a file" if out.is_file() else "a folder" if out.is_dir() else "something"
    return OutputError(f"{out} is {kind} that featcache did not make ({what} goes there); "
                       f"nothing was changed: choose another {option}")


def check_replaceable(out: Path, ours: Callable[[Path], bool], what: str, overwrite: bool, option: str = "--out") -> None:
    """Refuse to write the folder ``what`` at ``out`` unless it is absent or an empty folder, or it is one
    that featcache made (``ours``) and ``overwrite`` was given. A folder on an object store that a killed
    featcache was publishing is replaced as if empty (what was there before is half gone already)."""
    if is_unfinished(out) or (not out.exists() and not out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not out.is_dir() or out.is_symlink() or not ours(out):
        raise _refuse(out, what, option)
    if not overwrite:
        raise OutputError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another {option}")


def check_file_replaceable(out: Path, ours: Callable[[Path], bool], what: str, overwrite: bool, option: str) -> None:
    """The same rule for a single file: absent (in a folder that can be written), or one featcache made
    (``ours``) and ``overwrite`` given."""
    if not out.exists() and not out.is_symlink():
        check_writable(out, option)
        return
    if out.is_symlink() or not out.is_file() or not ours(out):
        raise _refuse(out, what, option)
    if not overwrite:
        raise OutputError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another {option}")


def check_writable(out: Path, option: str) -> None:
    """Refuse, before any work, an output whose nearest existing folder is not a writable folder (on an object
    store: whose bucket is not there)."""
    if isinstance(out, Remote):
        bucket = out.key.split("/")[0]
        if not out.fs.exists(bucket):
            raise OutputError(f"{out}: bucket {bucket} not found (or not visible with these credentials); "
                              f"choose another {option}")
        return
    here = out.absolute().parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir() or not os.access(here, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write there ({here} is not a folder this user can write); "
                          f"choose another {option}")


def write_output(out: str | os.PathLike, write: Callable[[Path], None], *, ours: Callable[[Path], bool], what: str,
                 overwrite: bool, option: str) -> Path:
    """A file the user named (``--json F``, ``--plot F``, an export): written atomically by one process at a
    time, replacing only a file featcache made, and only with ``overwrite``."""
    out = location(out)
    with exclusive(out, what, remove=True, option=option):
        check_file_replaceable(out, ours, what, overwrite, option)
        return write_file(out, write)


def replace_dir(tmp: Path, out: Path, owned: Callable[[str], bool] | None = None) -> None:
    """Move a finished folder into place; an existing one is moved aside first and removed only after the
    new one is in place. With ``owned`` (which relative file paths are featcache's in such a folder), the
    files a user added to the old folder are carried into the new one first (hard links: nothing is lost
    if the move is interrupted)."""
    old = None
    if out.exists():
        if owned is not None:
            _carry_over(out, tmp, owned)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _carry_over(old: Path, new: Path, owned: Callable[[str], bool]) -> None:
    for folder, dirs, files in os.walk(old):
        here = Path(folder).relative_to(old)
        for name in dirs + files:
            src, rel = Path(folder) / name, (here / name).as_posix()
            dst = new / rel
            if owned(rel) or dst.exists() or dst.is_symlink():
                continue
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                dst.mkdir()
            else:
                try:
                    os.link(src, dst)
                except OSError:  # a file system without hard links
                    shutil.copy2(src, dst)


def install_dir(tmp: Path, out: Path | Remote, *, record: str, owned: Callable[[str], bool] | None = None) -> None:
    """Put the finished folder ``tmp`` in place as ``out``: renamed over it on a local disk
    (:func:`replace_dir`), published object by object, ``record`` last, on an object store."""
    if isinstance(out, Remote):
        try:
            publish_dir(tmp, out, owned=owned, record=record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        replace_dir(tmp, out, owned)


def build_dir(out: str | os.PathLike | Remote, build: Callable[[Path], None], *, record: str, what: str,
              overwrite: bool, owned: Callable[[str], bool] | None = None) -> None:
    """``build(tmp)`` in a new temporary folder, installed as ``out`` when it returns, removed if it raises.
    A folder featcache made is one holding the file ``record``; ``owned`` says which files inside such a
    folder are featcache's: the others (a user's notes, an index another tool built there) survive
    ``--overwrite``."""
    out = location(out)
    with exclusive(out, what):
        check_replaceable(out, lambda d: (d / record).is_file(), what, overwrite)
        tmp = temp_dir_beside(out)
        try:
            build(tmp)
            install_dir(tmp, out, record=record, owned=owned)
        except BaseException as e:
            full = (isinstance(e, Exception) and not isinstance(e, OutputError)
                    and is_disk_full(e, tmp if isinstance(out, Remote) else out.parent))
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise disk_full_error(out) from None
            raise


def is_disk_full(e: BaseException, folder: Path) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT anywhere in the chain, or (for libraries that report
    it as their own error, as torch.save and safetensors do) almost no space left where it was writing."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if os.strerror(errno.ENOSPC) in str(e):  # faiss and arrow put the C library's message in their own errors
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
def exclusive(out: str | os.PathLike, what: str, *, remove: bool = False, wait: bool = False,
              option: str = "--out") -> Iterator[None]:
    """One writer at a time for ``out``: an advisory lock on a hidden file beside it, held while the block
    runs and released when the process ends, however it ends (the kernel drops it). A second writer is
    refused with one line, before it touches anything; with ``wait`` (small records, written in a moment)
    it waits its turn instead. With ``remove`` (single-file outputs, which leave nothing else beside them),
    the lock file is deleted when the block ends; a writer that locked a lock file just deleted notices
    that it is no longer the file at that path and locks the new one. On an object store the lock is an
    object (storage.acquire_lock); a small record's lock (``remove``) older than ten minutes is stale."""
    out = location(out)
    if isinstance(out, Remote):
        try:
            release = acquire_lock(out, what, wait=wait, option=option, stale_after=600 if remove else None)
        except StorageError as e:
            raise OutputError(str(e)) from None
        try:
            yield
        finally:
            release()
        return
    path = lock_file(out)
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputError(f"{out}: cannot write there ({e.strerror or type(e).__name__}); choose another {option}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{out}: another featcache process is writing {what} there; wait for it to finish, "
                              f"or choose another {option}") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        clean_leftovers(out)
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)  # while still locked: a waiting writer then sees another file
        os.close(fd)  # closing the descriptor releases the lock
