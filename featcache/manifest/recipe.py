"""Recipes: a training set written down as data (``manifests/m4d-35k.toml``): which builders to run
on which folders, with which options, and the curation rule for each source.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from featcache.manifest.builders import BUILDERS, Builder, build
from featcache.manifest.builders.common import read_text
from featcache.manifest.curate import DomainCount, NothingLeft, Rule, curate, domain_counts, rule_problem
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
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ManifestError(f"{where}: published.{k} must be an integer >= 0, got {_shown(v)}")
    return Published(value.get("classes"), value.get("images"))


def _shown(value) -> str:
    """A TOML value in an error message: what it is, and its value when short."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {ascii(value)[:60]}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return "a table" if isinstance(value, dict) else "an array" if isinstance(value, list) else f"{value}"[:60]


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\0" not in value


def _read_toml(path: Path) -> dict:
    text = read_text(path, "recipe")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise ManifestError(f"{path}: not readable TOML (nested too deeply)") from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe TOML (see manifests/m4d-35k.toml for the format): every key, and the type and range
    of every value, so that a mistake is one line naming the file and key before any source is built."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: recipe not found")
    data = _read_toml(path)
    unknown = [k for k in data if k not in ("name", "seed", "published", "source")]
    if unknown:
        raise ManifestError(f"{path}: unknown key {ascii(unknown[0])} (expected name, seed, published, [[source]])")
    name = data.get("name", path.stem)
    if not _is_text(name):
        raise ManifestError(f"{path}: name must be a non-empty string, got {_shown(name)}")
    seed = data.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ManifestError(f"{path}: seed must be a non-negative integer, got {_shown(seed)}")
    tables = data.get("source")
    if not tables:
        raise ManifestError(f"{path}: no [[source]] tables (one per source dataset)")
    if not isinstance(tables, list):
        raise ManifestError(f"{path}: source must be [[source]] tables (one per source dataset), got {_shown(tables)}")
    sources = [_source(t, k, path) for k, t in enumerate(tables, start=1)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: two sources are named '{next(n for n in names if names.count(n) > 1)}'")
    return Recipe(path, name, seed, sources, _published(data.get("published"), str(path)))


def _source(t, k: int, path: Path) -> Source:
    """The k-th [[source]] table, checked."""
    where = f"{path}: source {k}"
    if not isinstance(t, dict):
        raise ManifestError(f"{where}: expected a [[source]] table (builder = \"...\", rules, options), got {_shown(t)}")
    builder = t.get("builder")
    if not isinstance(builder, str) or builder not in BUILDERS:
        raise ManifestError(f"{where}: builder must be one of {', '.join(BUILDERS)}, got {_shown(builder)}")
    name = t.get("name", builder)
    if not _is_text(name):
        raise ManifestError(f"{where}: name must be a non-empty string, got {_shown(name)}")
    where = f"{path}: source '{name}'"
    options = {key: v for key, v in t.items() if key not in SOURCE_KEYS}
    for key, value in options.items():
        _check_option(BUILDERS[builder], key, value, where)
    folder = t.get("folder", name)
    if not _is_text(folder) or Path(folder).is_absolute() or ".." in Path(folder).parts:
        raise ManifestError(f"{where}: folder must be a relative folder name under the data root, got {_shown(folder)}")
    return Source(name, builder, folder, options, _rule(t, where), _published(t.get("published"), where))


def _check_option(builder: Builder, key: str, value, where: str) -> None:
    """A builder option given in a source table: one it takes, as a string (or, where it takes several, an array
    of strings). Its values are checked by the builder."""
    if key not in builder.options:
        takes = ", ".join(builder.options)
        raise ManifestError(f"{where}: unknown key {ascii(key)} (builder {builder.name} takes {takes}; rules: {', '.join(RULE_KEYS)})")
    several = builder.takes_list(key)
    if _is_text(value) or (several and isinstance(value, list) and value and all(map(_is_text, value))):
        return
    expected = "a string or an array of strings" if several else "a string"
    raise ManifestError(f"{where}: {key} must be {expected}, got {_shown(value)}")


def _rule(t: dict, where: str) -> Rule:
    args = {key: t[key] for key in RULE_KEYS if key in t}
    for key, v in args.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ManifestError(f"{where}: {key} must be an integer, got {_shown(v)}")
    problem = rule_problem(args.get("min_per_class", Rule.min_per_class), args.get("max_per_class"), args.get("max_classes"),
                           name=str)
    if problem:
        raise ManifestError(f"{where}: {problem}")
    return Rule(**args)


@dataclass
class SourceResult:
    source: Source
    before: dict[str, DomainCount]
    after: dict[str, DomainCount]
    notes: list[str]
    missing: bool = False  # its folder is not under the data root: left out, and said so
    empty: bool = False  # no class of it passed its rule: left out, and said so

    @property
    def left_out(self) -> bool:
        return self.missing or self.empty


def run_recipe(recipe: Recipe, data_root: str | os.PathLike, progress=None) -> tuple[Rows, list[SourceResult]]:
    """Build, curate and combine every source whose folder is under ``data_root``. The others come back as
    ``missing`` results, and sources that keep no images after their rule as ``empty`` ones: a recipe of many
    candidate sources builds from those at hand; nothing left at all is an error. Paths in the result are
    relative to ``data_root`` (``folder/...``). ``progress(message)`` is told what is happening, if given."""
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
        try:
            rows = build(src.builder, folder, **options)
        except ManifestError as e:
            raise _in_source(e, recipe, src) from None
        before = domain_counts(rows)
        if progress:
            progress(f"{src.name}: curating {len(rows):,} images ({src.rule.describe()})")
        try:
            kept = curate(rows, src.rule, recipe.seed)
        except NothingLeft as e:
            results.append(SourceResult(src, before, {}, [*rows.notes, f"{e}; left out"], empty=True))
            continue
        except ManifestError as e:
            raise ManifestError(f"source '{src.name}': {e}") from None
        results.append(SourceResult(src, before, domain_counts(kept), list(rows.notes)))
        parts.append(kept.with_path_prefix(src.folder))
    if not parts:
        empty = ", ".join(r.source.name for r in results if r.empty)
        rest = "; the other sources are not there" if absent else ""
        raise ManifestError(f"{recipe.path}: no images left under {data_root}: no class of {empty} passes its rule{rest}")
    return Rows.concat(parts), results


def _in_source(e: ManifestError, recipe: Recipe, src: Source) -> ManifestError:
    """A builder's error, said of the recipe's source. A bad option value (``--partition: ...`` on the command
    line) is a key of the source's table here."""
    message = str(e)
    if message.startswith("--"):
        option, _, rest = message[2:].partition(":")
        return ManifestError(f"{recipe.path}: source '{src.name}': {option.replace('-', '_')}:{rest}")
    return ManifestError(f"source '{src.name}': {message}")
