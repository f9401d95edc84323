"""The registry of source datasets: ``featcache manifest build SOURCE`` names to their builders.

Adding a source is one file in this folder (its builder function and its ``SOURCE`` entry) and one
line here.
"""

from __future__ import annotations

import os

from featcache.manifest.builders import (
    deepfashion,
    deepfashion2,
    fashion200k,
    food101,
    food_rec22,
    furniture180,
    gldv2,
    hm,
    ilias,
    imagefolder,
    m4d35k,
    met,
    products10k,
    rp2k,
    shopee,
    sop,
    stanford_cars,
    storefronts146,
    uned,
    webdataset,
)
from featcache.manifest.builders.common import Builder
from featcache.manifest.schema import ManifestError, Rows

BUILDERS: dict[str, Builder] = {
    module.SOURCE.name: module.SOURCE
    for module in (
        products10k,
        gldv2,
        deepfashion,
        met,
        shopee,
        hm,
        rp2k,
        sop,
        fashion200k,
        food_rec22,
        stanford_cars,
        deepfashion2,
        food101,
        furniture180,
        storefronts146,
        m4d35k,
        uned,
        ilias,
        imagefolder,
        webdataset,
    )
}


def build(source: str, root: str | os.PathLike, **options) -> Rows:
    """Run the builder registered as ``source`` with the options it takes (None values are left out)."""
    if source not in BUILDERS:
        raise ManifestError(f"unknown source '{source}' (expected one of {', '.join(BUILDERS)})")
    builder = BUILDERS[source]
    given = {k: v for k, v in options.items() if v is not None}
    for name in given:
        if name not in builder.options:
            takes = ", ".join(f"--{o.replace('_', '-')}" for o in builder.options) or "no options"
            raise ManifestError(f"--{name.replace('_', '-')} does not apply to {source} (it takes {takes})")
    rows = builder.func(root, **given)
    if not len(rows):
        raise ManifestError(f"{root}: {source} found no images")
    return rows
