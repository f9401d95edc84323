"""Where featcache's files live: a local path, or a folder on an object store named by an fsspec URL
(``s3://bucket/prefix``, ``gs://...``; ``file://`` is a local path).

:func:`location` turns what a user typed into a :class:`pathlib.Path` or a :class:`Remote`. A Remote
answers the part of Path's interface featcache reads with (``/``, ``name``, ``parent``, ``exists``,
``is_file``, ``read_bytes``, ``open``, ...), so readers need no second code path; writers go through
``files.py`` and ``cache.py``, which keep the same guarantees on an object store (ARCHITECTURE.md,
"Object stores"):

- an object is written whole by one PUT, never appended to: a chunk, a flag, a run's file;
- a folder is published with its record object (``zarr.json``, ``index.json``, ...) deleted first and
  written last, so a reader never takes a half-written folder for a finished one;
- one writer per output: a lock object ``.NAME.lock`` beside it, created with a conditional write
  (``If-None-Match: *``) that only one writer can win, and deleted when the writer ends (:func:`acquire_lock`).

Credentials come from where the storage library looks (environment, profiles, instance roles) or from
``--storage-options`` JSON; they are held in this process only, never written to a file or a message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

OPTIONS_ENV = "FEATCACHE_STORAGE_OPTIONS"


class StorageError(ValueError):
    """An object store that cannot be used as asked; the message names the URL and what to do."""


@dataclass
class Settings:
    options: dict[str, Any] | None = None  # None: read FEATCACHE_STORAGE_OPTIONS when first needed
    break_lock: bool = False


SETTINGS = Settings()


def configure(options: str | None = None, *, break_lock: bool | None = None) -> None:
    """Set the storage options (a JSON object, passed to the filesystem of every URL) and whether a writer
    may take a lock another writer left. The JSON is never echoed: it may hold secrets."""
    if options is not None:
        SETTINGS.options = _parse_options(options, "--storage-options")
        os.environ[OPTIONS_ENV] = options  # for the processes this one starts (decoding workers, spawned or not)
    if break_lock is not None:
        SETTINGS.break_lock = break_lock


def _parse_options(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise StorageError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}); give an object such as "
                           "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'") from None
    if not isinstance(value, dict):
        raise StorageError(f"{where}: a JSON object is needed, got {type(value).__name__}")
    return value


def storage_options() -> dict[str, Any]:
    if SETTINGS.options is None:
        text = os.environ.get(OPTIONS_ENV)
        SETTINGS.options = _parse_options(text, OPTIONS_ENV) if text else {}
    return SETTINGS.options


NOT_STORES = ("file", "http", "https")  # file:// is a local path; web addresses are not folders featcache reads


def is_url(text: str | os.PathLike) -> bool:
    """``text`` names an object store: a URL whose scheme is a word other than file, http or https."""
    if not isinstance(text, (str, Remote)):
        return False
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() not in NOT_STORES


def location(text: "str | os.PathLike | Remote") -> "Path | Remote":
    """A user's path or URL as featcache handles it: a Remote for object stores, else a local Path."""
    if isinstance(text, (Remote, Path)):
        return text
    text = os.fspath(text)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if is_url(text):
        return Remote(text)
    return Path(text)


def filesystem_options() -> dict[str, Any]:
    """What every filesystem of a URL is made with: the user's storage options, and no cached listings (other
    writers change what is there)."""
    return {"use_listings_cache": False, **storage_options()}


def filesystem(protocol: str):
    import fsspec

    try:
        return fsspec.filesystem(protocol, **filesystem_options())
    except ImportError as e:
        raise StorageError(f"{protocol}:// needs a package that is not installed ({e}); install it and run again") from None
    except ValueError as e:
        raise StorageError(f"{protocol}://: {str(e).splitlines()[0][:160]}") from None


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:160]


@dataclass(frozen=True)
class _Stat:
    st_size: int


class Remote:
    """A file or folder on an object store, named by its URL; reads and small writes like a Path."""

    __slots__ = ("protocol", "key")

    def __init__(self, url: str):
        protocol, _, key = str(url).partition("://")
        key = key.strip("/")
        if not protocol or not key:
            raise StorageError(f"{url}: not a URL of the form PROTOCOL://BUCKET/PATH")
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "key", key)

    # naming
    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str | os.PathLike) -> "Remote":
        return Remote(f"{self.url}/{os.fspath(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> "Remote":
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return Remote(f"{self.protocol}://{head}")

    def with_name(self, name: str) -> "Remote":
        return self.parent / name

    def resolve(self) -> "Remote":
        return self

    absolute = resolve

    def relative_to(self, other: "Remote") -> Path:
        prefix = other.key + "/"
        if not self.key.startswith(prefix):
            raise ValueError(f"{self} is not inside {other}")
        return Path(self.key[len(prefix):])

    # reading
    @property
    def fs(self):
        return filesystem(self.protocol)

    def _info(self) -> dict[str, Any] | None:
        """The object's (or folder's) listing entry, None where nothing is there; a store that cannot be reached
        or refuses the credentials is one line naming the URL, not "not found"."""
        try:
            return self.fs.info(self.key)
        except FileNotFoundError:
            return None
        except PermissionError as e:
            raise StorageError(f"{self}: access denied ({_first_line(e)}); check the credentials (environment, "
                               "profile or --storage-options)") from None
        except Exception as e:  # botocore/aiohttp connection errors, after the client's own retries
            raise StorageError(f"{self}: the object store did not answer ({type(e).__name__}: {_first_line(e)})") from None

    def exists(self) -> bool:
        return self._info() is not None

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "directory"

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> _Stat:
        return _Stat(int(self.fs.size(self.key)))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def open(self, mode: str = "rb", **kwargs):
        if "b" not in mode:
            import io

            return io.TextIOWrapper(self.fs.open(self.key, mode.replace("t", "") + "b"), **kwargs)
        return self.fs.open(self.key, mode, **kwargs)

    def iterdir(self) -> Iterator["Remote"]:
        for entry in sorted(self.fs.ls(self.key, detail=False)):
            entry = entry.rstrip("/")
            if entry != self.key:
                yield Remote(f"{self.protocol}://{entry}")

    def files(self) -> dict[str, int]:
        """Every object under this folder: relative name -> size (one listing)."""
        found = self.fs.find(self.key, detail=True)
        prefix = self.key + "/"
        return {k[len(prefix):]: int(v.get("size") or 0) for k, v in found.items()
                if k.startswith(prefix) and v.get("type") != "directory"}

    # writing (whole objects)
    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def put(self, local: Path) -> None:
        self.fs.put_file(str(local), self.key)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a folder exists once an object is in it."""


Where = Path | Remote


def same_place(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Two recorded locations name the same place (local ones after resolving)."""
    if a is None or b is None:
        return a == b
    if is_url(a) or is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def absolute(where: "str | os.PathLike | Remote", resolve: bool = False) -> str:
    """What featcache records for a location: the URL, or an absolute path (``os.path.abspath``: ``..``
    folded, symlinks kept; with ``resolve``, symlinks resolved too, as a cache's or run's own path is)."""
    where = location(where)
    if isinstance(where, Remote):
        return where.url
    return str(where.resolve()) if resolve else os.path.abspath(where)


# --- publishing a folder built locally ------------------------------------------------------------------


PUBLISHING = ".featcache-publishing"  # in a folder while featcache publishes it; gone once its record is in


def is_unfinished(folder: "Path | Remote") -> bool:
    """A folder on an object store that a killed featcache was publishing: the next writer replaces it."""
    return isinstance(folder, Remote) and (folder / PUBLISHING).is_file()


def publish_dir(local: Path, remote: Remote, *, owned: Callable[[str], bool] | None, record: str) -> None:
    """Make the folder ``remote`` hold the files of ``local``. A marker object says the folder is being
    published (a killed run leaves it, and the next writer may replace the folder); the record object goes
    (the folder stops being a finished one of featcache's), objects of the old folder that ``owned`` says
    are featcache's and the new one lacks are deleted (a user's other objects stay), the new files go up,
    the record last, then the marker goes."""
    old = remote.files() if remote.exists() else {}
    new = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    marker = remote / PUBLISHING
    marker.write_text(json.dumps(_holder()))
    if record in old:
        (remote / record).unlink(missing_ok=True)
    stale = [rel for rel in old if rel not in (record, PUBLISHING) and rel not in new and (owned is None or owned(rel))]
    if stale:
        remote.fs.rm([(remote / rel).key for rel in stale])
    upload(local, remote, [rel for rel in new if rel != record])
    if record in new:
        (remote / record).put(local / record)
    marker.unlink(missing_ok=True)


def upload(local: Path, remote: Remote, names: list[str]) -> None:
    """``local/NAME`` to ``remote/NAME`` for each name, each one whole object, several at a time."""
    if names:
        remote.fs.put([str(local / n) for n in names], [(remote / n).key for n in names])


class WorkingCopy:
    """A local copy of a remote folder that one writer (holding its lock) changes; :meth:`push` uploads
    what changed since the copy was made or last pushed, in the order it was written (each file whole), and
    deletes what was removed. For a local folder it is the folder itself and pushing does nothing."""

    def __init__(self, where: Where):
        self.remote = where if isinstance(where, Remote) else None
        self._tmp: Path | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        if self.remote is None:
            self.path = Path(where)
            return
        self._tmp = Path(tempfile.mkdtemp(prefix="featcache-"))
        self.path = self._tmp / self.remote.name
        self.path.mkdir()
        names = list(self.remote.files()) if self.remote.exists() else []
        if names:
            self.remote.fs.get([(self.remote / n).key for n in names], [str(self.path / n) for n in names])
        self._seen = self._state()

    def _state(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.path.rglob("*"):
            if p.is_file():
                st = p.stat()
                out[p.relative_to(self.path).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def push(self, order: tuple[str, ...] = ()) -> None:
        """Upload what changed in write order: by modification time, ties (a coarse clock) broken by ``order``,
        the names in the order the writer writes them."""
        if self.remote is None:
            return
        now = self._state()
        rank = {name: i for i, name in enumerate(order)}
        changed = sorted((rel for rel in now if self._seen.get(rel) != now[rel]),
                         key=lambda rel: (now[rel][1], rank.get(rel, -1)))
        for rel in changed:  # one at a time, in write order: the remote folder passes through the local states
            (self.remote / rel).put(self.path / rel)
        gone = [rel for rel in self._seen if rel not in now]
        for rel in gone:
            (self.remote / rel).unlink(missing_ok=True)
        self._seen = now

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


@contextlib.contextmanager
def working_copy(where: Where) -> Iterator[WorkingCopy]:
    copy = WorkingCopy(where)
    try:
        yield copy
    finally:
        copy.close()


@contextlib.contextmanager
def named_as(local: Path, where: Where) -> Iterator[None]:
    """Errors of the block that name the local copy ``local`` name ``where`` instead, as the user typed it."""
    try:
        yield
    except ValueError as e:
        if local == where or str(local) not in str(e):
            raise
        raise type(e)(str(e).replace(str(local), str(where))) from None


@contextlib.contextmanager
def local_file(where: Where, suffix: str = "") -> Iterator[Path]:
    """A local path holding the file ``where`` (downloaded for a remote one), for readers that need a name."""
    if not isinstance(where, Remote):
        yield Path(where)
        return
    fd, tmp = tempfile.mkstemp(prefix="featcache-", suffix=suffix or where.suffix)
    os.close(fd)
    try:
        where.fs.get_file(where.key, tmp)
        with named_as(Path(tmp), where):
            yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def local_dir(where: Where) -> Iterator[Path]:
    """A local copy of the folder ``where`` (itself when local); errors naming the copy name ``where``."""
    if not isinstance(where, Remote):
        yield Path(where)
        return
    with working_copy(where) as copy, named_as(copy.path, where):
        yield copy.path


# --- one writer per output: a lock object ---------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` on this host (field 22 of /proc/PID/stat), or None if it is gone:
    a pid reused by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _holder() -> dict[str, Any]:
    """Who writes: enough to tell, on the same machine, whether that process is still alive (host, boot,
    pid namespace, pid and the process's start time), and a nonce that makes each lock unique."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid_namespace": _pid_namespace(), "pid": pid,
            "started": _process_start(pid), "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "nonce": os.urandom(8).hex()}


def _left_by_dead_writer(holder: dict[str, Any]) -> bool:
    """A lock whose writer ran on this machine since its last boot, in this pid namespace (containers sharing
    a host name do not count), and whose process is gone or is another process now."""
    pid = holder.get("pid")
    if (holder.get("host") != socket.gethostname() or holder.get("boot") != _boot_id() or _boot_id() is None
            or holder.get("pid_namespace") != _pid_namespace() or not isinstance(pid, int) or pid <= 0):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's: its start time may be hidden (hidepid)
        started = _process_start(pid)
        return started is not None and started != holder.get("started")
    return _process_start(pid) != holder.get("started")


def _age_seconds(holder: dict[str, Any]) -> float:
    try:
        since = _dt.datetime.fromisoformat(holder["since"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (_dt.datetime.now(_dt.timezone.utc) - since).total_seconds()


@contextlib.contextmanager
def _host_mutex(lock: Remote) -> Iterator[None]:
    """Serialises, on this host, the takeover of a dead writer's lock (two takers must not both delete it)."""
    name = hashlib.sha256(lock.url.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"featcache-lock-{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_holder(lock: Remote) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"
            if holder else "an unreadable lock")


def _try_create(lock: Remote, body: bytes) -> bool | None:
    """True: created; False: another lock is there; None: the store answered neither (a 409 conflict with a
    concurrent delete, a dropped connection): try again."""
    try:
        lock.fs.pipe_file(lock.key, body, mode="create")
        return True
    except FileExistsError:
        return False
    except PermissionError:
        raise StorageError(f"{lock.parent}: access denied writing {lock.name}; check the credentials") from None
    except FileNotFoundError:
        bucket = lock.key.split("/")[0]
        raise StorageError(f"{lock.parent}: bucket {bucket} not found (or not visible with these credentials)") from None
    except (TypeError, NotImplementedError):  # a filesystem without conditional writes
        raise StorageError(f"{lock.parent}: {lock.protocol}:// cannot create an object only where none is (a "
                           "conditional write), which featcache's one-writer lock needs") from None
    except OSError:
        return None


def acquire_lock(out: Remote, what: str, *, wait: bool = False, option: str = "--out",
                 stale_after: float | None = None) -> Callable[[], None]:
    """Take ``.NAME.lock`` beside ``out``; returns the function that releases it. Taken over without asking when
    its writer ran on this machine and has died (see :func:`_left_by_dead_writer`), or is older than
    ``stale_after`` seconds (locks around small records); with ``--break-lock``, whoever holds it; otherwise
    refused in one line (or, with ``wait``, waited for). A takeover is serialised among this machine's
    processes; across machines only ``--break-lock`` and ``stale_after`` take a lock, on the user's word."""
    lock = out.parent / f".{out.name}.lock"
    mine = _holder()
    body = json.dumps(mine).encode()
    delay, unanswered = 0.05, 0
    while True:
        created = _try_create(lock, body)
        holder = None if created else _read_holder(lock)
        if created or holder == mine:  # a retried PUT whose first try had created it is ours too
            break
        if created is None:
            unanswered += 1
            if unanswered > 5:
                raise StorageError(f"{lock}: the store did not accept or refuse the lock object in 6 tries")
            time.sleep(delay * unanswered)
            continue
        if holder is None:
            continue  # released in between
        take = SETTINGS.break_lock or _left_by_dead_writer(holder) or (
            stale_after is not None and _age_seconds(holder) > stale_after)
        if take:
            with _host_mutex(lock):
                if _read_holder(lock) == holder:  # still the one judged gone: no other taker came first
                    lock.unlink(missing_ok=True)
            continue
        if wait:
            time.sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        raise StorageError(f"{out}: {_describe(holder)} is writing {what} there (lock object .{out.name}.lock); wait "
                           f"for it to finish, or choose another {option}; if that writer is gone (killed on another "
                           "host), run again with --break-lock")

    def release() -> None:
        with contextlib.suppress(OSError):
            if _read_holder(lock) == mine:
                lock.unlink(missing_ok=True)

    return release
