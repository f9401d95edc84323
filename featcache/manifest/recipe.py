"""Recipes: a training set written down as data (``manifests/m4d-35k.toml``): which builders to run
on which folders, with which options, and the curation rule for each source.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from featcache.manifest.builders import BUILDERS, build
from featcache.manifest.curate import DomainCount, Rule, curate, domain_counts
from featcache.manifest.schema import ManifestError, Rows

RULE_KEYS = ("min_per_class", "max_per_class", "max_classes")
SOURCE_KEYS = ("name", "builder", "folder", "published", *RULE_KEYS)


@dataclass
class Published:
    classes: int | None = None
    images: int | None = None


@dataclass
class Source:
    """One source dataset of a recipe: a builder run on DATA/folder, then curated by ``rule``."""

    name: str
    builder: str
    folder: str
    options: dict
    rule: Rule
    published: Published = field(default_factory=Published)


@dataclass
class Recipe:
    path: Path
    name: str
    seed: int
    sources: list[Source]
    published: Published = field(default_factory=Published)


def _published(value, where: str) -> Published:
    if value is None:
        return Published()
    if not isinstance(value, dict) or set(value) - {"classes", "images"}:
        raise ManifestError(f"{where}: 'published' must be a table with 'classes' and/or 'images'")
    for k, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ManifestError(f"{where}: published.{k} must be an integer, got {v!r}")
    return Published(value.get("classes"), value.get("images"))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe TOML (see manifests/m4d-35k.toml for the format)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: recipe not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: not valid TOML ({e})") from None
    unknown = set(data) - {"name", "seed", "published", "source"}
    if unknown:
        raise ManifestError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected name, seed, published, [[source]])")
    seed = data.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ManifestError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    tables = data.get("source")
    if not isinstance(tables, list) or not tables:
        raise ManifestError(f"{path}: no [[source]] tables (one per source dataset)")
    sources = []
    for k, t in enumerate(tables, start=1):
        where = f"{path}: source {k}"
        builder = t.get("builder")
        if builder not in BUILDERS:
            raise ManifestError(f"{where}: builder must be one of {', '.join(BUILDERS)}, got {builder!r}")
        name = t.get("name", builder)
        where = f"{path}: source '{name}'"
        options = {key: v for key, v in t.items() if key not in SOURCE_KEYS}
        for key in options:
            if key not in BUILDERS[builder].options:
                takes = ", ".join(BUILDERS[builder].options)
                raise ManifestError(f"{where}: unknown key '{key}' (builder {builder} takes {takes}; rules: {', '.join(RULE_KEYS)})")
        folder = t.get("folder", name)
        if not isinstance(folder, str) or not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise ManifestError(f"{where}: folder must be a relative folder name under the data root, got {folder!r}")
        rule_args = {key: t[key] for key in RULE_KEYS if key in t}
        for key, v in rule_args.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ManifestError(f"{where}: {key} must be an integer, got {v!r}")
        sources.append(Source(name, builder, folder, options, Rule(**rule_args), _published(t.get("published"), where)))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: two sources are named '{next(n for n in names if names.count(n) > 1)}'")
    return Recipe(path, data.get("name", path.stem), seed, sources, _published(data.get("published"), str(path)))


@dataclass
class SourceResult:
    source: Source
    before: dict[str, DomainCount]
    after: dict[str, DomainCount]
    notes: list[str]
    missing: bool = False  # its folder is not under the data root: left out, and said so


def run_recipe(recipe: Recipe, data_root: str | os.PathLike, progress=None) -> tuple[Rows, list[SourceResult]]:
    """Build, curate and combine every source whose folder is under ``data_root`` (the others come back
    as ``missing`` results: a recipe of many candidate sources builds from those at hand; none at hand is
    an error). Paths in the result are relative to ``data_root`` (``folder/...``). ``progress(message)``
    is told what is happening, if given."""
    data_root = Path(data_root)
    parts, results = [], []
    absent = [s for s in recipe.sources if not (data_root / s.folder).is_dir()]
    if len(absent) == len(recipe.sources):
        raise ManifestError(f"{data_root}: none of the sources of {recipe.path} is there (expected folders "
                            f"{', '.join(s.folder for s in recipe.sources)})")
    for src in recipe.sources:
        folder = data_root / src.folder
        if src in absent:
            results.append(SourceResult(src, {}, {}, [f"{folder}: folder not found; left out"], missing=True))
            continue
        if progress:
            progress(f"{src.name}: building from {folder}")
        options = dict(src.options)
        if "colors" in options:  # a file of the source, named relative to its folder
            options["colors"] = folder / options["colors"]
        rows = build(src.builder, folder, **options)
        before = domain_counts(rows)
        if progress:
            progress(f"{src.name}: curating {len(rows):,} images ({src.rule.describe()})")
        try:
            kept = curate(rows, src.rule, recipe.seed)
        except ManifestError as e:
            raise ManifestError(f"source '{src.name}': {e}") from None
        results.append(SourceResult(src, before, domain_counts(kept), list(rows.notes)))
        parts.append(kept.with_path_prefix(src.folder))
    return Rows.concat(parts), results
