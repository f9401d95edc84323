"""Writing what deploy makes: a file or a folder appears whole or not at all, and only a folder that
featcache made (it holds featcache's marker file) is ever replaced."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from featcache.deploy.embedder import DeployError


def write_file(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a new temporary file beside ``out``, renamed into place once it is whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets; a model file is read by others
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_dir(out: Path, overwrite: bool, marker: str, what: str) -> Path:
    """A new temporary folder beside ``out`` to build in. An existing ``out`` must be empty, or be one of
    ours (it holds ``marker``) and ``overwrite`` given; anything else is refused."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / marker).is_file():
            raise DeployError(f"{out} exists and is not {what} written by featcache; choose another --out")
        if not overwrite:
            raise DeployError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def install_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place, replacing the old one only after the new one is whole."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "replaced")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dir(out: Path, overwrite: bool, marker: str, what: str, build: Callable[[Path], None]) -> None:
    """``build(tmp)`` in a new temporary folder, installed as ``out`` when it returns, removed if it raises."""
    tmp = new_dir(out, overwrite, marker, what)
    try:
        build(tmp)
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
