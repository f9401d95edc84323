"""``featcache serve``: indexes behind an HTTP API and a web page."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import List, Optional

import typer

from featcache.cli.console import err, friendly_errors, place

app = typer.Typer()


@app.command(epilog="Example: featcache serve --index runs/demo/index --root manifests/demo  (then open http://127.0.0.1:8000)")
@friendly_errors
def serve(
    index_dirs: List[str] = typer.Option(..., "--index", "-i", metavar="DIR", help="An index written by `featcache index` (a folder or a URL); repeatable. Served under its folder's name."),
    model: Optional[Path] = typer.Option(None, help="Embed query images with this `featcache export` .pt (or .zip) instead of rebuilding backbone and head."),
    weights: Optional[Path] = typer.Option(None, help="The backbone's weights file, when the indexes' caches were extracted from one."),
    root: Optional[str] = typer.Option(None, help="Where the indexed images are, for thumbnails. \\[default: the root each index recorded]"),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but this machine needs --token."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, envvar="FEATCACHE_TOKEN", help="Require 'Authorization: Bearer TOKEN' on the API (the page asks for it). Also read from $FEATCACHE_TOKEN."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    max_batch: int = typer.Option(32, min=1, help="Most query images per forward pass of the model."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="Longest a query waits for others to share its forward pass."),
    max_upload: str = typer.Option("16MB", help="Largest request body accepted (an upload)."),
    max_pixels: int = typer.Option(40_000_000, min=1, help="Largest image accepted, in pixels (width x height), checked before decoding."),
    max_k: int = typer.Option(1000, min=1, help="Most neighbours one query may ask for."),
    workers: int = typer.Option(4, min=1, help="Threads that decode uploads and search the indexes."),
    read_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a request body may pause before the request is refused (408)."),
) -> None:
    """Serve indexes over HTTP: a search page at /, the API at /search, /indexes, /image, /healthz, /metrics
    (OpenAPI page at /docs).

    Queries are embedded as `featcache search` embeds them. Concurrent queries share forward passes of the
    model (at most --max-batch images, waiting at most --max-wait-ms). Thumbnails come only from the served
    indexes' rows, read under --root. Binds 127.0.0.1 unless --host says otherwise, and then needs --token.
    """
    import uvicorn

    from featcache.cli.evaluate import parse_bytes
    from featcache.deploy.serve import LOOPBACK, Limits, check_binding, create_app
    from featcache.devices import resolve_device

    check_binding(host, token)
    limits = Limits(max_upload_bytes=parse_bytes(max_upload), max_pixels=max_pixels, max_k=max_k,
                    max_batch=max_batch, max_wait_ms=max_wait_ms, read_timeout=read_timeout)
    api = create_app([place(d) for d in index_dirs], model=model, weights=weights, device=resolve_device(device),
                     root=place(root), token=token, limits=limits, workers=workers,
                     hosts=LOOPBACK if host in LOOPBACK else None)
    gc.collect()
    gc.freeze()  # the model's and the libraries' objects are never garbage: full collections need not walk them
    names = ", ".join(api.state.served)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving {names} on http://{shown}:{port} (page /, API /docs); Ctrl-C stops", markup=False, highlight=False)
    uvicorn.run(api, host=host, port=port, log_level=os.environ.get("FEATCACHE_LOG_LEVEL", "warning"),
                timeout_keep_alive=30)
