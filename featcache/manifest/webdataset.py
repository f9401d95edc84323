"""WebDataset conventions shared by the builder that lists shards' samples and the extraction that reads them.

A WebDataset shard is a tar whose members are grouped into samples by key: ``KEY.jpg``, ``KEY.json``,
``KEY.txt``, ``KEY.cls`` ... (the key is the member's path up to the first dot of its file name; what
follows is the field). img2dataset writes shards of about 10k samples this way, with a parquet of the
same samples' metadata beside each shard (``00000.tar`` and ``00000.parquet``).

In a manifest, a sample is the path ``SHARD#KEY``: the shard's path (relative to the root, as any
manifest path) ending in ``.tar``, then ``#`` and the sample's key, e.g. ``shards/00012.tar#000120034``.
Extraction reads such rows by streaming each shard once, front to back.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
from typing import Iterator

from featcache.storage import Remote, StorageError, location

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
_SAMPLE = re.compile(r"(.+?\.tar)#(.+)")  # split at the first ".tar#": keys may hold '#' 
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def sample_path(shard: str, key: str) -> str:
    return f"{shard}#{key}"


def parse_sample(path: str) -> tuple[str, str] | None:
    """(shard, key) of a manifest path naming a WebDataset sample, or None for an ordinary file. A path is a
    sample when it holds ``.tar#``: a loose file named so (``x.tar#2/a.jpg``) is read as a sample too."""
    m = _SAMPLE.fullmatch(path)
    return (m.group(1), m.group(2)) if m else None


def split_member(name: str) -> tuple[str, str]:
    """A tar member's (key, field): ``a/b/000123.jpg`` -> (``a/b/000123``, ``jpg``); ``x.seg.png`` -> (``x``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field.lower()


def expand_braces(pattern: str) -> list[str]:
    """Shard names of a brace pattern, as webdataset and img2dataset write them: ``{00000..00002}.tar`` ->
    ``00000.tar``, ``00001.tar``, ``00002.tar`` (zero-padded like the first bound); ``{a,b}`` -> a, b."""
    m = _RANGE.search(pattern) or _CHOICE.search(pattern)
    if m is None:
        return [pattern]
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"--shards {pattern}: the range {{{lo}..{hi}}} runs backwards")
        if int(hi) - int(lo) > 10_000_000:
            raise ValueError(f"--shards {pattern}: more than 10,000,000 shards")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = m.group(1).split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [name for c in choices for name in expand_braces(head + c + tail)]


def read_samples(shard: str | os.PathLike, keys: set[str]) -> Iterator[tuple[str, bytes | None, str]]:
    """Stream one shard once, front to back (never seeking: a tar read from a pipe or an object store reads
    the same way): ``(key, image bytes, "")`` for each of ``keys`` as its first image member passes, then
    ``(key, None, reason)`` for each key the shard does not hold (or holds past the point where it broke)."""
    left = set(keys)
    problem = None
    try:
        with contextlib.ExitStack() as stack:
            shard = location(shard)
            source = stack.enter_context(shard.open("rb"))  # a local file, or an object streamed from a store
            tar = stack.enter_context(tarfile.open(fileobj=source, mode="r|*"))
            for member in tar:
                key, field = split_member(member.name)
                if key in left and field in IMAGE_FIELDS and member.isfile():
                    data = tar.extractfile(member).read()  # a shard cut inside it raises here: the key stays left
                    left.discard(key)
                    yield key, data, ""
                    if not left:
                        break
    except FileNotFoundError:
        problem = "missing shard"
    except PermissionError as e:
        if isinstance(shard, Remote):  # the store refused: every shard would fail alike, so the run stops
            raise StorageError(f"{shard}: access denied ({e}); check the credentials") from None
        problem = f"unreadable shard: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    except (tarfile.TarError, OSError, EOFError) as e:
        problem = f"unreadable shard: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    for key in sorted(left):
        yield key, None, problem or f"no image for key {key} in its shard"
