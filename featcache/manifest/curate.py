"""Curation: min/max images per class, max classes, seeded.

A class is a (domain, label) pair. Curation is vectorised (one pass to number the classes, then
numpy), so a 4M-row GLDv2 manifest curates in about 5 s on 2 cores, and it is reproducible: classes
are numbered in sorted order and every random draw comes from ``numpy.random.PCG64(seed)``, so the
result depends only on the input rows, the rule and the seed (not on dict order or platform).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featcache.manifest.schema import ManifestError, Rows, read_manifest, rows_from_manifest


class NothingLeft(ManifestError):
    """Curation filtered out every class: nothing to write (a recipe leaves such a source out)."""


def rule_problem(min_per_class, max_per_class, max_classes, name=lambda key: "--" + key.replace("_", "-")) -> str | None:
    """What is wrong with a curation rule, or None; ``name`` spells a key as the user wrote it (an option, or a
    recipe key)."""
    if min_per_class < 1:
        return f"{name('min_per_class')} must be at least 1, got {min_per_class}"
    if max_per_class is not None and max_per_class < min_per_class:
        return f"{name('max_per_class')} {max_per_class} is below {name('min_per_class')} {min_per_class}"
    if max_classes is not None and max_classes < 1:
        return f"{name('max_classes')} must be at least 1, got {max_classes}"
    return None


@dataclass(frozen=True)
class Rule:
    """Keep classes with at least ``min_per_class`` images, at most ``max_classes`` of them (chosen at
    random), and at most ``max_per_class`` images of each (chosen at random). None: no limit."""

    min_per_class: int = 1
    max_per_class: int | None = None
    max_classes: int | None = None

    def __post_init__(self) -> None:
        problem = rule_problem(self.min_per_class, self.max_per_class, self.max_classes)
        if problem:
            raise ManifestError(problem)

    def describe(self) -> str:
        parts = [f"at least {self.min_per_class} per class"]
        if self.max_per_class is not None:
            parts.append(f"at most {self.max_per_class} per class")
        if self.max_classes is not None:
            parts.append(f"at most {self.max_classes:,} classes")
        return ", ".join(parts)


def _factorize(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """(code per value, distinct values in first-seen order); one pass in C (dict.fromkeys, map)."""
    if values and values.count(values[0]) == len(values):  # one domain: common, and a fast check
        return np.zeros(len(values), np.int64), [values[0]]
    distinct = list(dict.fromkeys(values))
    position = {v: i for i, v in enumerate(distinct)}
    return np.fromiter(map(position.__getitem__, values), np.int64, count=len(values)), distinct


def class_ids(rows: Rows) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Number the (domain, label) classes 0..C-1 in sorted order; returns (per-row id, classes)."""
    lab, labels = _factorize(rows.labels)
    dom, domains = _factorize(rows.domains)
    pair = dom * len(labels) + lab  # one integer per (domain, label)
    present = np.zeros(len(domains) * len(labels), bool)
    present[pair] = True
    uniq = np.flatnonzero(present)  # the (domain, label) pairs that occur, without sorting all rows
    compact = np.cumsum(present) - 1
    n_lab = len(labels)
    classes = [(domains[p // n_lab], labels[p % n_lab]) for p in uniq.tolist()]
    order = sorted(range(len(classes)), key=classes.__getitem__)  # canonical: sorted (domain, label)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[compact[pair]], [classes[i] for i in order]


def curate(rows: Rows, rule: Rule, seed: int = 42) -> Rows:
    """Apply ``rule``: drop small classes, pick at most ``max_classes``, cap each at ``max_per_class``.

    Rows keep their input order. An empty result (every class filtered out) is an error (``NothingLeft``).
    """
    if not len(rows):
        raise ManifestError("no rows to curate")
    if seed < 0:
        raise ManifestError(f"--seed must be a non-negative integer, got {seed}")
    cls, classes = class_ids(rows)
    counts = np.bincount(cls, minlength=len(classes))
    class_seed, row_seed = np.random.SeedSequence(seed).spawn(2)
    eligible = np.flatnonzero(counts >= rule.min_per_class)
    if not eligible.size:
        raise NothingLeft(
            f"no class has at least {rule.min_per_class} images (largest has {counts.max()}): "
            f"all {len(classes):,} classes would be filtered out"
        )
    if rule.max_classes is not None and eligible.size > rule.max_classes:
        rng = np.random.Generator(np.random.PCG64(class_seed))
        eligible = np.sort(rng.choice(eligible, size=rule.max_classes, replace=False))
    keep_class = np.zeros(len(classes), bool)
    keep_class[eligible] = True
    keep = keep_class[cls]
    if rule.max_per_class is not None and (counts[eligible] > rule.max_per_class).any():
        # A random key per input row (drawn for all rows, so a row's key depends only on its
        # position), then each class's rows in key order: keep the first max_per_class.
        key = np.random.Generator(np.random.PCG64(row_seed)).random(len(rows))
        idx = np.flatnonzero(keep)
        order = idx[np.lexsort((key[idx], cls[idx]))]
        sorted_cls = cls[order]
        starts = np.flatnonzero(np.r_[True, sorted_cls[1:] != sorted_cls[:-1]])
        first_of_run = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        rank_in_class = np.arange(len(order)) - first_of_run
        keep = np.zeros(len(rows), bool)
        keep[order[rank_in_class < rule.max_per_class]] = True
    return rows.take(keep)


@dataclass
class DomainCount:
    classes: int
    images: int


def domain_counts(rows: Rows) -> dict[str, DomainCount]:
    """Classes and images per domain, domains sorted by name."""
    if not len(rows):
        return {}
    cls, classes = class_ids(rows)
    counts = np.bincount(cls, minlength=len(classes))
    result: dict[str, DomainCount] = {}
    for (domain, _), n in zip(classes, counts.tolist()):
        c = result.setdefault(domain, DomainCount(0, 0))
        c.classes += 1
        c.images += n
    return dict(sorted(result.items()))


def read_inputs(paths: Sequence[str | os.PathLike]) -> Rows:
    """Read and validate manifests (``read_manifest``) and put them one after another; a path listed
    in two of them is an error. Paths are copied as written: give manifests that share one root."""
    if not paths:
        raise ManifestError("give at least one manifest to curate")
    return Rows.concat([rows_from_manifest(read_manifest(p)) for p in paths])
