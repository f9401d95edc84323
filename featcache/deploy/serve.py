"""``featcache serve``: one or more indexes behind an HTTP API and a web page.

Routes (FastAPI; the OpenAPI page is at ``/docs``):
- ``POST /search``: an uploaded image (multipart field ``image``), or JSON with one of ``image_base64``,
  ``embedding`` or ``row`` (that row's own image, as the page's "search by this result" sends), plus
  ``index``, ``k`` and an optional ``domain``; answers the neighbours' row, path, label, domain and cosine score;
- ``GET /indexes``, ``GET /image/{index}/{row}`` (a thumbnail of a served row's image: never a path taken
  from the request), ``GET /healthz``, ``GET /metrics`` (Prometheus' text format);
- ``GET /``: the page (plain HTML, CSS and JavaScript from ``featcache/deploy/web``; nothing from the internet).

Queries are embedded as ``featcache search`` embeds them (the index's backbone and head, or an exported
model). Requests arriving together are embedded together: a request waits at most ``max_wait_ms`` for others,
up to ``max_batch`` images per forward pass; decoding and search run in a thread pool. Every refused request
is a 4xx JSON ``{"error": "one line"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
import pyarrow.compute as pc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from featcache.deploy.embedder import DeployError
from featcache.deploy.index import Index, module_embedder, path_resolver
from featcache.evaluate.search import import_faiss
from featcache.images import ImageFailure, load_image, load_image_bytes

log = logging.getLogger("featcache.serve")

WEB = "web"  # the page's files, beside this module
THUMB_SIZES = (16, 1024)  # the ?size= a thumbnail may ask for
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_ASPECT = 32  # longest side over shortest side of an upload
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")  # metric labels; any other is "other"


@dataclass
class Limits:
    """What one request may ask of the service."""

    max_upload_bytes: int = 16 << 20
    max_pixels: int = 40_000_000
    max_k: int = 1000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_pending: int = 128  # decoded query images held at once, waiting for the model
    read_timeout: float = 30.0  # seconds a request body may pause between two pieces


class Refused(Exception):
    """A request the service answers with a 4xx status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Batcher:
    """Images from concurrent requests embedded together. The first image of a batch waits at most
    ``max_wait`` seconds for others, and a batch holds at most ``max_batch`` images; one thread runs the model,
    so requests never contend for it. ``embed`` takes what ``prepare`` made of each image (``prepare`` runs
    in the caller's thread: resizing a large upload never holds up the batch)."""

    def __init__(self, embed: Callable[[list], np.ndarray], max_batch: int = 32, max_wait: float = 0.005,
                 observe: Callable[[int], None] | None = None, prepare: Callable[[Any], Any] = lambda image: image):
        self.embed, self.prepare, self.observe = embed, prepare, observe
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="featcache-batcher", daemon=True)
        self.thread.start()

    def submit(self, prepared) -> Future:
        """A future of the (dim,) embedding of an image ``prepare`` made."""
        done: Future = Future()
        self.queue.put((prepared, done))
        return done

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, deadline, stop = [first], time.monotonic() + self.max_wait, False
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            # a request given up (its future cancelled) is dropped; the others are now running
            self._run([(x, done) for x, done in batch if done.set_running_or_notify_cancel()])
            if stop:
                return

    def _run(self, batch: list) -> None:
        if not batch:
            return
        if self.observe is not None:
            self.observe(len(batch))
        try:
            vectors = self.embed([x for x, _ in batch])
        except Exception as e:
            if len(batch) > 1:  # one request's fault is its own: each alone
                for item in batch:
                    self._run([item])
            else:
                batch[0][1].set_exception(e)
            return
        for (_, done), vector in zip(batch, vectors):
            done.set_result(vector)


@dataclass
class Served:
    """One index as the service serves it."""

    name: str
    index: Index
    batcher: Batcher
    root: str
    domains: list[str] = field(default_factory=list)
    _by_domain: dict[str, tuple] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return int(self.index.meta["rows"])

    def image(self, row: int):
        """Row ``row``'s image, decoded, read under the served root (a 404 when it cannot be read)."""
        path = self.index.rows.column("path")[row].as_py()
        try:
            return load_image(path_resolver(self.root)([path])[0])
        except ImageFailure as e:
            raise Refused(404, f"row {row}'s image {path!r} cannot be read under the served root ({e})") from None

    def rows_of(self, domain: str) -> tuple[np.ndarray, Any]:
        """The rows of ``domain`` (sorted), and a faiss selector of them (built once per domain)."""
        if domain not in self._by_domain:
            if domain not in self.domains:
                shown = ", ".join(self.domains[:20])
                raise Refused(400, f"domain {domain[:80]!r}: no such domain in index {self.name!r} (domains: {shown})")
            found = np.flatnonzero(pc.equal(self.index.rows.column("domain"), domain).to_numpy(zero_copy_only=False))
            self._by_domain[domain] = (found.astype(np.int64), import_faiss().IDSelectorBatch(found.astype(np.int64)))
        return self._by_domain[domain]

    def search(self, vector: np.ndarray, k: int, domain: str | None) -> list[dict[str, Any]]:
        """The top ``k`` rows for one L2-normalised vector, of ``domain`` only when given."""
        q = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        if domain is None:
            scores, ids = self.index.search(q, k)
        else:
            scores, ids = self._search_domain(q, k, *self.rows_of(domain))
        found = ids[0] >= 0
        rows = self.index.rows.take(ids[0][found]).select(["path", "label", "domain"]).to_pydict()
        link = f"/image/{quote(self.name, safe='')}/"
        return [{"row": int(i), "path": path, "label": label, "domain": dom, "score": float(s), "image": f"{link}{int(i)}"}
                for s, i, path, label, dom in zip(scores[0][found], ids[0][found], rows["path"], rows["label"], rows["domain"])]

    def _search_domain(self, q: np.ndarray, k: int, allowed: np.ndarray, selector):
        faiss = import_faiss()
        k = min(k, len(allowed))
        top = faiss.downcast_index(self.index.faiss_index)
        inner = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexPreTransform) else top
        params = (faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe) if isinstance(inner, faiss.IndexIVF)
                  else faiss.SearchParameters(sel=selector))
        if inner is not top:  # OPQ or PCA before the index: the selector goes to the index inside
            params = faiss.SearchParametersPreTransform(index_params=params)
        try:  # faiss filters inside the search where the index kind takes a selector
            scores, ids = self.index.faiss_index.search(q, k, params=params)
            if np.isin(ids[ids >= 0], allowed).all():  # some kinds ignore it: then it is done below
                return scores, ids
        except (RuntimeError, TypeError, AttributeError):
            pass
        want = k  # a kind without selectors: ask for more neighbours until k of the domain are among them
        while True:
            want = min(self.rows, want * 8)
            scores, ids = self.index.search(q, want)
            keep = np.isin(ids[0], allowed)
            if keep.sum() >= k or want >= self.rows:
                return scores[:, keep][:, :k], ids[:, keep][:, :k]


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token."""
    if host not in LOOPBACK and not token:
        raise DeployError(f"--host {host} serves beyond this machine: give --token (clients then send "
                          "'Authorization: Bearer TOKEN'), or bind 127.0.0.1")


def open_served(index_dirs: list, *, model=None, weights=None, device: str = "cpu", root=None,
                limits: Limits | None = None, observe: Callable[[int], None] | None = None) -> dict[str, Served]:
    """The indexes, each named by its folder, with one batcher per embedding model: indexes of one space share it."""
    limits = limits or Limits()
    served: dict[str, Served] = {}
    batchers: dict[str, Batcher] = {}
    for where in index_dirs:
        index = Index.open(where)
        name = index.path.name
        if name in served:
            raise DeployError(f"--index {where}: another served index is also named {name!r} (names are folder names)")
        space = json.dumps(index.meta["space"], sort_keys=True)
        if space not in batchers:
            if model is not None:  # the exported module resizes inside: it takes the decoded image as it is
                batchers[space] = Batcher(module_embedder(index, model), limits.max_batch, limits.max_wait_ms / 1000, observe)
            else:
                embedder = index.embedder(weights, device)
                batchers[space] = Batcher(embedder.embed_prepared, limits.max_batch, limits.max_wait_ms / 1000, observe,
                                          prepare=embedder.prepare)
        domains = sorted(pc.unique(index.rows.column("domain")).to_pylist())
        served[name] = Served(name, index, batchers[space], str(root) if root is not None else index.meta["root"], domains)
    return served


def decode_upload(data: bytes, max_pixels: int):
    """An uploaded image, decoded: its size and shape checked from the header before any pixel is decoded."""
    from PIL import Image

    if not data:
        raise Refused(400, "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError as e:
        raise Refused(413, f"the image has too many pixels ({str(e).splitlines()[0][:120]})") from None
    except Exception:  # whatever a decoder raises on bytes from outside: the upload is at fault
        raise Refused(400, "not an image (unrecognised or damaged format)") from None
    if w * h > max_pixels:
        raise Refused(413, f"the image has {w}x{h} = {w * h:,} pixels; this service takes at most {max_pixels:,}")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):  # resized to the model's input, it would be huge
        raise Refused(413, f"the image is {w}x{h}: one side is more than {MAX_ASPECT} times the other")
    try:
        return load_image_bytes(data)
    except ImageFailure as e:
        raise Refused(413 if "bomb" in str(e) else 400, f"the image cannot be decoded: {e}") from None
    except Exception as e:
        raise Refused(400, f"the image cannot be decoded ({type(e).__name__})") from None


def thumbnail(served: Served, row: int, size: int) -> bytes:
    """A JPEG of at most ``size`` pixels a side of row ``row``'s image, read from the served root."""
    if not 0 <= row < served.rows:
        raise Refused(404, f"index {served.name!r} has no row {row} (rows 0 to {served.rows - 1})")
    image = served.image(row)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("featcache_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.errors = Counter("featcache_request_errors", "HTTP requests answered with a 4xx or 5xx status",
                              ["route", "status"], registry=self.registry)
        self.latency = Histogram("featcache_request_seconds", "Time to answer a request", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch = Histogram("featcache_batch_images", "Images per forward pass of the model",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(index_dirs: list, *, model=None, weights=None, device: str = "cpu", root=None, token: str | None = None,
               limits: Limits | None = None, workers: int = 4, hosts: tuple[str, ...] | None = LOOPBACK):
    """The FastAPI app serving ``index_dirs`` (each opened and checked before the app exists). ``hosts``: the
    names a request's Host header may give (loopback by default, so that no web page can reach the service
    through a DNS name that resolves to this machine); None: any."""
    from featcache import __version__

    limits = limits or Limits()
    metrics = Metrics()
    served = open_served(index_dirs, model=model, weights=weights, device=device, root=root, limits=limits,
                         observe=metrics.batch.observe)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featcache-serve")
    pending = asyncio.Semaphore(limits.max_pending)  # decoded images held at once, waiting for the model
    default_index = next(iter(served))

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        for batcher in {id(s.batcher): s.batcher for s in served.values()}.values():
            batcher.close()
        pool.shutdown(wait=False)

    # FastAPIOffline: FastAPI with the /docs page's scripts served from the package, not fetched from a CDN
    app = FastAPIOffline(title="featcache", version=__version__, lifespan=lifespan, description=
                         "Search featcache indexes by image or embedding. Errors are JSON: {\"error\": \"one line\"}.")

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status,
                            headers={**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})})

    @app.exception_handler(Refused)
    async def refused(_, e: Refused):
        return error(e.status, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code in (404, 405) and e.detail in ("Not Found", "Method Not Allowed"):  # the router's own
            return error(e.status_code, f"no {request.method[:10]} {request.url.path[:100]} here (see /docs)", e.headers)
        return error(e.status_code, str(e.detail)[:200], e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    def host_allowed(request: Request) -> bool:
        if hosts is None:
            return True
        host = request.headers.get("host", "").lower()
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name in hosts

    def authorised(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        try:
            if not host_allowed(request):
                raise Refused(421, f"this service answers requests for {', '.join(hosts)} only (Host: "
                                   f"{request.headers.get('host', '')[:60]!r}); serve with --host and --token to be reached by other names")
            if token and request.url.path not in PUBLIC and not request.url.path.startswith(PUBLIC_FOLDERS) \
                    and not authorised(request):
                raise Refused(401, "a bearer token is required (Authorization: Bearer TOKEN)")
            response = await call_next(request)
        except Refused as e:
            response = error(e.status, str(e))
        except ClientDisconnect:  # nobody to answer: counted, not logged as the service's fault
            response = error(499, "the client closed the connection before its request was read")
        except Exception as e:  # logged here in full; the client gets one line and no traceback
            log.exception("internal error")
            response = error(500, f"internal error ({type(e).__name__})")
        name = getattr(request.scope.get("route"), "path", "other")
        method = request.method if request.method in METHODS else "other"
        metrics.requests.labels(name, method, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    async def in_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def pick(name: Any) -> Served:
        name = default_index if name in (None, "") else str(name)
        if name not in served:
            raise Refused(404, f"index {name[:80]!r}: not served (indexes: {', '.join(served)})")
        return served[name]

    def number(value: Any, what: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Refused(422, f"{what}: {str(value)[:40]!r} is not a whole number")
        try:
            n = int(value)
        except ValueError:
            raise Refused(422, f"{what}: {str(value)[:40]!r} is not a whole number") from None
        if not lo <= n <= hi:
            raise Refused(422, f"{what}: {str(n)[:40]} is outside {lo} to {hi}")
        return n

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_upload_bytes:
            raise Refused(413, f"the request is {int(length):,} bytes; this service takes at most {limits.max_upload_bytes:,}")
        chunks, seen = [], 0
        stream = request.stream().__aiter__()
        while True:  # counted as it arrives (a body without a length is bounded too), and never waited for long
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), limits.read_timeout)
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:
                raise Refused(408, f"the request body stopped arriving for {limits.read_timeout:g} s") from None
            seen += len(chunk)
            if seen > limits.max_upload_bytes:
                raise Refused(413, f"the request is over {limits.max_upload_bytes:,} bytes, the most this service takes")
            chunks.append(chunk)

    async def fields_of(request: Request) -> dict[str, Any]:
        """The request's fields; the query is one of ``image`` (bytes), ``image_base64``, ``embedding`` or ``row``."""
        body = await read_body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
            except Exception as e:  # the multipart parser's own errors
                raise Refused(400, f"the multipart body cannot be read ({str(e)[:80] or type(e).__name__})") from None
            try:
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise Refused(400, "the multipart body has no file field 'image' (or it is cut short)")
                fields = {key: form.get(key) for key in ("index", "k", "domain")}
                fields["image"] = await upload.read()
            finally:
                await form.close()
            return fields
        if kind != "application/json":
            raise Refused(415, "send multipart/form-data with a file field 'image', or JSON with image_base64, embedding or row")
        return await in_pool(parse_json, body)

    async def embedding_of(fields: dict[str, Any], where: Served) -> np.ndarray:
        """The query's L2-normalised embedding: an image's through the index's model (batched), or the one given."""
        if "embedding" in fields:
            return fields["embedding"]
        if "row" in fields:
            row = number(fields["row"], "row", 0, where.rows - 1)
            load = lambda: where.batcher.prepare(where.image(row))  # noqa: E731
        else:
            data = fields["image"]
            load = lambda: where.batcher.prepare(decode_upload(data, limits.max_pixels))  # noqa: E731
        async with pending:
            return await asyncio.wrap_future(where.batcher.submit(await in_pool(load)))

    @app.post("/search", openapi_extra=SEARCH_BODY, summary="Nearest rows to an image or an embedding")
    async def search(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        fields = await fields_of(request)
        where = pick(fields.get("index"))
        k = number(10 if fields.get("k") in (None, "") else fields["k"], "k", 1, limits.max_k)
        domain = fields.get("domain")
        if domain == "":
            domain = None
        if domain is not None and not isinstance(domain, str):
            raise Refused(400, "domain: give a domain's name")
        if "embedding" in fields and len(fields["embedding"]) != int(where.index.meta["dim"]):
            raise Refused(400, f"embedding: index {where.name!r} takes {where.index.meta['dim']} numbers "
                               f"(got {len(fields['embedding'])})")
        vector = await embedding_of(fields, where)
        neighbours = await in_pool(where.search, vector, min(k, where.rows), domain)
        return {"index": where.name, "k": k, "domain": domain, "neighbours": neighbours,
                "took_ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.get("/indexes", summary="The served indexes")
    async def indexes() -> list[dict[str, Any]]:
        return [{"name": s.name, "rows": s.rows, "dim": s.index.meta["dim"], "kind": s.index.meta["index"]["kind"],
                 "run": Path(s.index.meta["run"]).name if s.index.meta.get("run") else None, "domains": s.domains}
                for s in served.values()]

    @app.api_route("/image/{index}/{row}", methods=["GET", "HEAD"], summary="A thumbnail of a served row's image",
                   response_class=Response)
    async def image(index: str, row: str, size: int = 256):
        where = pick(index)
        n = number(row, "row", -(1 << 62), 1 << 62)
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise Refused(422, f"size: {size} is outside {THUMB_SIZES[0]} to {THUMB_SIZES[1]}")
        data = await in_pool(thumbnail, where, n, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "indexes": len(served)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("featcache.deploy").joinpath(WEB)
    static = {name: page.joinpath(name).read_bytes() for name in ("app.js", "style.css")}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return HTMLResponse(page.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def files(name: str):
        if name not in static:
            raise Refused(404, f"no file {name[:80]!r}")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(static[name], media_type=kind)

    app.state.served = served
    return app


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON search request's fields, checked: one query (``image`` bytes from ``image_base64``, an L2-normalised
    ``embedding`` or a ``row``), and the options as given."""
    try:
        fields = json.loads(body, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not a number")))
    except (ValueError, RecursionError) as e:
        raise Refused(400, f"the JSON body cannot be read ({str(e)[:80]})") from None
    if not isinstance(fields, dict):
        raise Refused(400, "the JSON body must be an object")
    given = [key for key in ("image_base64", "embedding", "row") if fields.get(key) is not None]
    if len(given) != 1:
        raise Refused(400, "give one of image_base64, embedding or row")
    fields = {key: fields.get(key) for key in ("index", "k", "domain", given[0])}
    if given[0] == "image_base64":
        text = fields.pop("image_base64")
        if not isinstance(text, str):
            raise Refused(400, "image_base64: give the image's bytes as base64 text")
        if text.startswith("data:"):  # a data: URL, as a page may send it
            header, comma, text = text.partition(",")
            if not comma or not header.endswith(";base64"):
                raise Refused(400, "image_base64: a data: URL must be 'data:<type>;base64,<bytes>'")
        try:
            fields["image"] = base64.b64decode("".join(text.split()), validate=True)  # line breaks allowed
        except (binascii.Error, ValueError):
            raise Refused(400, "image_base64: not valid base64") from None
    elif given[0] == "embedding":
        vector = fields["embedding"]
        if not isinstance(vector, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
            raise Refused(400, "embedding: give a list of numbers")
        try:
            x = np.asarray(vector, dtype=np.float64)
        except OverflowError:
            raise Refused(400, "embedding: a number is too large") from None
        norm = np.linalg.norm(x) if np.isfinite(x).all() else np.inf
        if not np.isfinite(norm) or not norm > 0:
            raise Refused(400, "embedding: give finite numbers, not all zero")
        fields["embedding"] = (x / norm).astype(np.float32)
    return fields


PUBLIC = ("/", "/healthz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")  # no data: no token needed
PUBLIC_FOLDERS = ("/static/", "/static-offline-docs/")

SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "The query image."},
        "index": {"type": "string", "description": "Which served index (default: the first)."},
        "k": {"type": "integer", "minimum": 1, "default": 10},
        "domain": {"type": "string", "description": "Only neighbours of this domain."}}}},
    "application/json": {"schema": {"type": "object", "description": "One of image_base64, embedding or row.",
                                    "properties": {
        "image_base64": {"type": "string", "description": "The query image's bytes, base64 (or a data: URL)."},
        "embedding": {"type": "array", "items": {"type": "number"}, "description": "A vector of the index's space."},
        "row": {"type": "integer", "description": "Search by this row's own image (of `index`)."},
        "index": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "default": 10},
        "domain": {"type": "string"}}}}}}}


__all__ = ["Batcher", "Limits", "Refused", "check_binding", "create_app", "decode_upload", "open_served"]
