"""``featcache demo``: the whole pipeline, offline, on scikit-learn's bundled digits."""

from __future__ import annotations

from pathlib import Path

from featcache.console import err


def run_demo(model: str = "tiny-vit", weights: Path | None = None, device: str = "cpu", workers: int = 1) -> dict:
    from featcache.demo_data import DEMO_DIR, write_digits
    from featcache.extract import run_extract
    from featcache.manifest import read_manifest
    from featcache.models import create_backbone

    manifest_path = write_digits(DEMO_DIR)
    manifest = read_manifest(manifest_path)
    err.print(f"[bold]1/3 extract[/]: {len(manifest):,} digit images ({manifest_path}) through {model}")
    if model == "tiny-vit" and weights is None:
        err.print("    The backbone is a tiny open_clip ViT with seeded [bold]random weights[/]: pretrained weights "
                  "need a download. Pass --model siglip-so400m --weights FILE for the real thing.")
    backbone = create_backbone(model, weights, device)
    cache_path = Path("cache") / "demo" / f"{model.replace(':', '-').replace('/', '-')}.zarr"
    result = run_extract(manifest, backbone, cache_path, batch_size=128, workers=workers, device=device)
    return {"cache": str(result.path), "rows": result.rows, "seconds": round(result.seconds, 2)}
