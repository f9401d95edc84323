"""H&M Personalized Fashion: ``articles.csv`` (``article_id,product_code,...``; quoted descriptions hold
commas), images at ``images/0XX/0XXXXXXXXX.jpg`` (the 10-digit article id, its first three digits as the
folder). Label = product_code: an article's colour variants are one product."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import (
    Builder,
    CsvTable,
    check_column,
    check_unique,
    list_dir,
    prefix_labels,
    require_dir,
    single_split,
)
from featcache.manifest.schema import Rows


def hm(root: str | os.PathLike, *, domain: str = "hm") -> Rows:
    """One row per article that has an image; articles without one (the dataset has some) are left out
    and counted in the notes. Ids are read as text and zero-padded (10 and 7 digits), so a copy saved by
    a spreadsheet that dropped the leading zero still finds its files."""
    root = Path(root)
    table = CsvTable(root / "articles.csv", ("article_id", "product_code"),
                     "H&M articles: articles.csv with columns article_id,product_code,...")
    articles = [s.strip() for s in table.column("article_id")]
    products = [s.strip() for s in table.column("product_code")]
    check_column(table, "article_id", articles, lambda s: not s.isdigit() or len(s) > 10, "article_id '{value}' is not a number of up to 10 digits")
    check_column(table, "product_code", products, lambda s: not s.isdigit() or len(s) > 7, "product_code '{value}' is not a number of up to 7 digits")
    articles = [a.zfill(10) for a in articles]
    check_unique(table, "article_id", articles)
    images = require_dir(root / "images", "H&M images: images/0XX/0XXXXXXXXX.jpg")
    present: dict[str, set[str]] = {}
    for a in articles:
        folder = a[:3]
        if folder not in present:
            present[folder] = {e.name for e in list_dir(images / folder)} if (images / folder).is_dir() else set()
    keep = [f"{a}.jpg" in present[a[:3]] for a in articles]
    paths = [f"images/{a[:3]}/{a}.jpg" for a, k in zip(articles, keep) if k]
    labels = [p.zfill(7) for p, k in zip(products, keep) if k]
    rows = single_split(paths, prefix_labels(domain, labels), domain)
    if len(paths) < len(articles):
        rows.notes.append(f"{len(articles) - len(paths)} of {len(articles)} articles have no image in {images} and were left out")
    return rows


SOURCE = Builder("hm", hm, "H&M Personalized Fashion articles (domain hm)", "articles.csv (article_id,product_code,...), images/0XX/0XXXXXXXXX.jpg")
