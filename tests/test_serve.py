"""`featcache serve` through a real uvicorn process on 127.0.0.1: the API answers what `featcache search` answers,
refuses bad requests with a 4xx JSON line, batches concurrent queries; the page works in a real headless chromium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import PYTHON, free_port, subprocess_env, write_csv, write_images


def invoke(*args, code: int = 0):
    from featcache.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """18 real images in 3 classes and 2 domains, extracted with the seeded tiny open_clip ViT, a head trained on
    them and an exact index: (root, index dir)."""
    tmp = tmp_path_factory.mktemp("serve")
    data = tmp / "data"
    names = write_images(data / "images", 18, size=(64, 48))
    write_csv(data / "m.csv", ["path", "label", "domain", "split"],
              [[f"images/{n}", f"c{i % 3}", f"d{i % 2}", "train"] for i, n in enumerate(names)])
    invoke("extract", "--model", "tiny-vit", "--manifest", data / "m.csv", "--root", data, "--out", tmp / "c.zarr",
           "--dtype", "float32", "--device", "cpu", "--workers", "0")
    invoke("train-head", "--cache", tmp / "c.zarr", "--epochs", "2", "--batch-size", "6", "--out", tmp / "run", "--quiet")
    invoke("index", "--cache", tmp / "c.zarr", "--run", tmp / "run", "--out", tmp / "demo-index")
    invoke("index", "--cache", tmp / "c.zarr", "--run", tmp / "run", "--ivf", "2", "--nprobe", "2", "--out", tmp / "ivf-index")
    invoke("index", "--cache", tmp / "c.zarr", "--out", tmp / "raw-index")  # no head: another model serves it
    for name, factory in (("pca-ivf-index", "PCA8,IVF2,Flat"), ("pq-index", "PQ4x2")):  # approximate, compressed
        invoke("index", "--cache", tmp / "c.zarr", "--run", tmp / "run", "--factory", factory, "--out", tmp / name)
    shutil.copytree(tmp / "demo-index", tmp / "odd #name")  # an index moved, to a folder name a URL must escape
    return data, tmp / "demo-index"


class Server:
    """`featcache serve` in its own process, on a free local port."""

    def __init__(self, *args, env: dict | None = None):
        self.port = free_port()
        self.proc = subprocess.Popen([PYTHON, "-m", "featcache", "serve", "--port", str(self.port), "--device", "cpu",
                                      *map(str, args)], env={**subprocess_env(), **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server stopped: {self.proc.stdout.read()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("the server did not answer /healthz in 120 s")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunked: bool = False):
        """(status, headers, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            if chunked:
                conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                             headers=headers or {}, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, payload=None, headers: dict | None = None, raw: bytes | None = None):
        body = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(data)

    def upload(self, image: bytes, headers: dict | None = None, chunked: bool = False, **fields):
        body, kind = multipart(image, fields)
        status, _, data = self.request("POST", "/search", body, {"Content-Type": kind, **(headers or {})}, chunked)
        return status, json.loads(data)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            return self.proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[0]


def multipart(image: bytes, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


INDEXES = ("demo-index", "ivf-index", "raw-index", "pca-ivf-index", "pq-index", "odd #name")


@pytest.fixture(scope="module")
def server(collection):
    _, index = collection
    s = Server(*[arg for name in INDEXES for arg in ("--index", index.parent / name)],
               "--max-upload", "1MB", "--max-pixels", "4000000", "--max-wait-ms", "20", "--read-timeout", "2")
    yield s
    s.stop()


def one_error(status: int, answer: dict, want_status: int | tuple) -> str:
    assert status in ((want_status,) if isinstance(want_status, int) else want_status), (status, answer)
    assert set(answer) == {"error"} and "\n" not in answer["error"] and "Traceback" not in answer["error"], answer
    return answer["error"]


def test_search_answers_what_featcache_search_answers(server, collection, tmp_path):
    data, index = collection
    image = data / "images" / "img0004.png"
    invoke("search", "--index", index, image, "--k", "5", "--json", tmp_path / "s.json", "-q")
    want = json.loads((tmp_path / "s.json").read_text())["queries"][0]["neighbours"]
    status, got = server.upload(image.read_bytes(), k="5")
    assert status == 200 and got["index"] == "demo-index" and len(got["neighbours"]) == 5
    assert [str(data / n["path"]) for n in got["neighbours"]] == [n["path"] for n in want]
    assert [n["score"] for n in got["neighbours"]] == pytest.approx([n["score"] for n in want], abs=1e-5)
    assert [(n["label"], n["domain"]) for n in got["neighbours"]] == [(n["label"], n["domain"]) for n in want]
    assert got["neighbours"][0]["path"] == "images/img0004.png"  # the image itself, first
    # the index of raw features, served beside it by its own model: what `featcache search` answers there
    invoke("search", "--index", index.parent / "raw-index", image, "--k", "3", "--json", tmp_path / "r.json", "-q")
    want = json.loads((tmp_path / "r.json").read_text())["queries"][0]["neighbours"]
    status, raw = server.upload(image.read_bytes(), k="3", index="raw-index")
    assert status == 200 and [str(data / n["path"]) for n in raw["neighbours"]] == [n["path"] for n in want]
    assert [n["score"] for n in raw["neighbours"]] == pytest.approx([n["score"] for n in want], abs=1e-5)
    # an index whose name a URL must escape: its thumbnail links work as given
    status, odd = server.upload(image.read_bytes(), k="2", index="odd #name")
    assert status == 200 and odd["neighbours"][0]["image"] == "/image/odd%20%23name/4"
    assert server.request("GET", odd["neighbours"][0]["image"])[0] == 200
    # base64 as `base64` writes it, with line breaks
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(image.read_bytes()).decode(), 76))
    status, again = server.json("POST", "/search", {"image_base64": wrapped, "k": 5})
    assert status == 200 and [n["row"] for n in again["neighbours"]] == [n["row"] for n in got["neighbours"]]
    # the same image as base64 (and as a data: URL), and by its row
    b64 = base64.b64encode(image.read_bytes()).decode()
    for payload in ({"image_base64": b64, "k": 5}, {"image_base64": "data:image/png;base64," + b64, "k": 5},
                    {"row": got["neighbours"][0]["row"], "k": 5}):
        status, again = server.json("POST", "/search", payload)
        assert status == 200 and [n["row"] for n in again["neighbours"]] == [n["row"] for n in got["neighbours"]]


def test_an_embedding_and_a_domain_filter_against_brute_force(server, collection):
    import faiss

    _, index = collection
    stored = faiss.read_index(str(index / "index.faiss"))
    vectors = stored.reconstruct_n(0, stored.ntotal)
    rng = np.random.default_rng(0)
    query = rng.normal(size=vectors.shape[1])
    scores = vectors @ (query / np.linalg.norm(query))
    status, got = server.json("POST", "/search", {"embedding": query.tolist(), "k": 7})
    assert status == 200
    for scale in (1e30, 1e-30):  # only the direction counts: float32 would overflow or vanish
        status, scaled = server.json("POST", "/search", {"embedding": (query * scale).tolist(), "k": 7})
        assert status == 200 and [n["row"] for n in scaled["neighbours"]] == [n["row"] for n in got["neighbours"]]
        assert [n["score"] for n in scaled["neighbours"]] == pytest.approx([n["score"] for n in got["neighbours"]], abs=1e-6)
    assert [n["row"] for n in got["neighbours"]] == np.argsort(-scores, kind="stable")[:7].tolist()
    assert [n["score"] for n in got["neighbours"]] == pytest.approx(np.sort(scores)[::-1][:7], abs=1e-5)
    odd = np.arange(len(scores)) % 2 == 1  # rows of domain d1
    want = np.flatnonzero(odd)[np.argsort(-scores[odd], kind="stable")][:4]
    for name in ("demo-index", "ivf-index"):  # a selector in faiss's flat search; an IVF index searching every list
        status, got = server.json("POST", "/search", {"embedding": query.tolist(), "k": 4, "domain": "d1", "index": name})
        assert status == 200 and [n["row"] for n in got["neighbours"]] == want.tolist()
        assert {n["domain"] for n in got["neighbours"]} == {"d1"}
    for name in ("pca-ivf-index", "pq-index"):  # approximate: the d1 rows of its own unfiltered ranking, in order
        status, every = server.json("POST", "/search", {"embedding": query.tolist(), "k": 18, "index": name})
        status, got = server.json("POST", "/search", {"embedding": query.tolist(), "k": 4, "domain": "d1", "index": name})
        assert [n["row"] for n in got["neighbours"]] == [n["row"] for n in every["neighbours"] if n["domain"] == "d1"][:4]


def test_indexes_images_health_and_metrics(server, collection):
    data, _ = collection
    status, indexes = server.json("GET", "/indexes")
    assert status == 200 and [(i["name"], i["rows"], i["kind"], i["domains"]) for i in indexes] == [
        (name, 18, kind, ["d0", "d1"]) for name, kind in zip(INDEXES, ("flat", "ivf", "flat", "factory", "factory", "flat"))]
    assert indexes[0]["dim"] == 64 and indexes[2]["run"] is None
    status, headers, body = server.request("GET", "/image/demo-index/3?size=32")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(body)).convert("RGB")
    original = Image.open(data / "images" / "img0003.png").convert("RGB")
    original.thumbnail((32, 32))
    assert thumb.size == original.size == (32, 24)
    coarse = [np.asarray(im.resize((4, 3), Image.BOX), dtype=float) for im in (thumb, original)]
    assert np.abs(coarse[0] - coarse[1]).max() < 12  # a JPEG of the same picture (of noise: compared coarsely)
    assert server.request("GET", "/healthz")[0] == 200
    status, page_headers, page = server.request("GET", "/")
    assert status == 200 and b"/static/app.js" in page and b"http" not in page.replace(b"http-equiv", b"")
    status, _, docs = server.request("GET", "/docs")
    assert status == 200 and b"/static-offline-docs/swagger-ui-bundle.js" in docs and b"cdn" not in docs  # offline
    assert b"/search" in server.request("GET", "/openapi.json")[2]
    server.request("GET", "/image/demo-index/99999")
    from prometheus_client.parser import text_string_to_metric_families

    status, _, text = server.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["featcache_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/image/{index}/{row}", "404")] >= 1 and requests[("/healthz", "200")] >= 1
    errors = {s.labels["route"]: s.value for s in families["featcache_request_errors"].samples if s.name.endswith("_total")}
    assert errors["/image/{index}/{row}"] >= 1 and "/healthz" not in errors
    counts = [s for s in families["featcache_request_seconds"].samples
              if s.name.endswith("_count") and s.labels["route"] == "/healthz"]
    assert counts and counts[0].value >= 2


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "white").save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_bad_requests_are_one_json_line_with_a_4xx(server, collection):
    data, _ = collection
    image = (data / "images" / "img0001.png").read_bytes()
    cases = [
        (server.upload(b"not an image at all"), 400, "not an image"),
        (server.upload(b""), 400, "empty"),
        (server.upload(image[:200]), 400, ""),  # a truncated PNG
        (server.upload(png((4000, 4000))), 413, "pixels"),  # 16M pixels in a few kB: refused before decoding
        (server.upload(os.urandom(2 << 20)), 413, "bytes"),  # over --max-upload 1MB, with a length
        (server.upload(os.urandom(2 << 20), chunked=True), 413, "bytes"),  # and without one
        (server.upload(image, k="0"), 422, "k"),
        (server.upload(image, k="many"), 422, "k"),
        (server.upload(image, index="nope"), 404, "nope"),
        (server.upload(image, domain="nowhere"), 400, "nowhere"),
        (server.json("POST", "/search", raw=b"{not json"), 400, "JSON"),
        (server.json("POST", "/search", {"k": 3}), 400, "one of"),
        (server.json("POST", "/search", {"image_base64": "!!!", "k": 3}), 400, "base64"),
        (server.json("POST", "/search", {"embedding": [1.0, 2.0]}), 400, "embedding"),
        (server.json("POST", "/search", raw=b'{"embedding": [NaN, 1]}'), 400, ""),
        (server.json("POST", "/search", {"embedding": [0.0] * 4, "row": 1}), 400, "one of"),
        (server.json("POST", "/search", {"row": 18}), 422, "row"),
        (server.json("GET", "/image/demo-index/..%2F..%2F..%2Fetc%2Fpasswd"), (404, 422), ""),
        (server.json("GET", "/image/demo-index/..%252F..%252Fetc"), 422, "row"),
        (server.json("GET", "/image/..%2F..%2Fetc/passwd"), 404, ""),
        (server.json("GET", "/image/demo-index/-1"), 404, "no row"),
        (server.json("GET", "/image/elsewhere/0"), 404, "not served"),
        (server.json("GET", "/image/demo-index/1?size=100000"), 422, "size"),
        (server.json("GET", "/nothing-here"), 404, ""),
        (server.json("DELETE", "/search"), 405, ""),
        (server.upload(png((2, 200_000))), 413, "times the other"),  # 400k pixels, but resized it would be huge
        (server.json("POST", "/search", {"image_base64": "data:image/png;base64"}), 400, "data: URL"),
        (server.json("POST", "/search", raw=b'{"embedding": [1' + b"0" * 400 + b', 1]}'), 400, "too large"),
        (server.json("POST", "/search", {"embedding": [1e300] * 64}), 400, "finite"),
        (server.json("POST", "/search", {"row": 3, "k": 2.5}), 422, "k"),
        (server.json("POST", "/search", {"row": True}), 422, "row"),
        (server.json("POST", "/search", {"row": 3, "domain": 0}), 400, "domain"),
        (server.json("POST", "/search", {"row": 3, "domain": False}), 400, "domain"),
        (server.json("POST", "/search", {"row": 3, "index": "x" * 5000}), 404, "not served"),
        (server.json("GET", "/indexes", headers={"Host": "evil.example"}), 421, "127.0.0.1"),
    ]
    status, _, body = server.request("POST", "/search", b"k=3", {"Content-Type": "text/plain"})
    cases.append(((status, json.loads(body)), 415, "multipart"))
    for (status, answer), want, words in cases:
        assert words in one_error(status, answer, want)
        assert len(answer["error"]) < 400  # what the request sent is not echoed whole
    status, headers, _ = server.request("DELETE", "/search")
    assert "POST" in headers.get("allow", "")
    # a body that stops arriving is refused after --read-timeout (2 s here), not waited for
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body, kind = multipart(image, {"k": "3"})
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", kind)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body[:100])
    r = conn.getresponse()
    assert r.status == 408 and "stopped arriving" in json.loads(r.read())["error"]
    conn.close()
    # a client that goes away mid-body is not the service's error
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", kind)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body[:100])
    conn.close()
    assert server.request("HEAD", "/healthz")[0] == 200 and server.request("FOO", "/healthz")[0] == 405
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(0.5)
    families = {f.name: f for f in text_string_to_metric_families(server.request("GET", "/metrics")[2].decode())}
    samples = [s.labels for s in families["featcache_requests"].samples if s.name.endswith("_total")]
    assert not [x for x in samples if x["status"].startswith("5")]
    assert {x["method"] for x in samples} <= {"GET", "HEAD", "POST", "DELETE", "other"}  # "FOO" is not a label
    assert server.request("GET", "/healthz")[0] == 200  # and it still answers


def test_concurrent_queries_share_forward_passes(server, collection):
    from prometheus_client.parser import text_string_to_metric_families

    data, _ = collection
    images = [(data / "images" / f"img{i:04d}.png").read_bytes() for i in range(18)]
    expected = {i: server.upload(images[i], k="3")[1]["neighbours"][0]["row"] for i in range(3)}
    answers: dict[int, list] = {}

    def ask(i: int) -> None:
        answers[i] = [server.upload(images[(i + j) % 3], k="3") for j in range(4)]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, replies in answers.items():  # each reply is its own query's, whatever batch it was in
        for j, (status, answer) in enumerate(replies):
            assert status == 200 and answer["neighbours"][0]["row"] == expected[(i + j) % 3]
    families = {f.name: f for f in text_string_to_metric_families(server.request("GET", "/metrics")[2].decode())}
    batch = {s.name: s.value for s in families["featcache_batch_images"].samples}
    assert batch["featcache_batch_images_sum"] > batch["featcache_batch_images_count"]  # some pass took several images


def test_batcher_returns_each_its_own_embedding():
    from featcache.deploy.serve import Batcher

    gate, calls = threading.Event(), []

    def embed(items):
        calls.append(len(items))
        gate.wait(10)  # the first pass holds the model while the others queue
        return np.array([[x, 2 * x] for x in items], dtype=np.float32)

    b = Batcher(embed, max_batch=4, max_wait=0.05)
    futures = [b.submit(float(i)) for i in range(1)]
    time.sleep(0.1)
    futures += [b.submit(float(i)) for i in range(1, 10)]
    gate.set()
    for i, f in enumerate(futures):
        np.testing.assert_array_equal(f.result(10), [i, 2 * i])
    assert calls[0] == 1 and max(calls[1:]) == 4 and sum(calls) == 10
    failing = Batcher(lambda items: 1 / 0, max_wait=0)
    with pytest.raises(ZeroDivisionError):
        failing.submit(1.0).result(10)
    b.close(), failing.close()


def test_batcher_survives_a_cancelled_request_and_isolates_a_failing_one():
    from featcache.deploy.serve import Batcher

    gate = threading.Event()

    def embed(items):
        gate.wait(10)
        if any(x < 0 for x in items):
            raise ValueError("a negative image")
        return np.array([[x] for x in items], dtype=np.float32)

    b = Batcher(embed, max_batch=8, max_wait=0.05)
    first = b.submit(1.0)  # holds the model while the next ones queue
    time.sleep(0.1)
    given_up, bad, good = b.submit(2.0), b.submit(-1.0), b.submit(3.0)
    assert given_up.cancel()  # its request went away before the model took it
    gate.set()
    assert first.result(10)[0] == 1.0 and good.result(10)[0] == 3.0  # the bad one fails alone
    with pytest.raises(ValueError):
        bad.result(10)
    assert b.submit(4.0).result(10)[0] == 4.0 and b.thread.is_alive()
    b.close()


def test_a_token_guards_the_api_and_an_exported_model_embeds_the_queries(collection, tmp_path):
    data, index = collection
    r = invoke("serve", "--index", index, "--host", "0.0.0.0", code=2)
    assert r.output.startswith("error: --host 0.0.0.0") and "--token" in r.output
    invoke("export", "--run", index.parent / "run", "--out", tmp_path / "model.pt")
    image = data / "images" / "img0009.png"
    invoke("search", "--index", index, image, "--model", tmp_path / "model.pt", "--k", "4", "--json", tmp_path / "s.json", "-q")
    want = json.loads((tmp_path / "s.json").read_text())["queries"][0]["neighbours"]
    s = Server("--index", index, "--model", tmp_path / "model.pt", env={"FEATCACHE_TOKEN": "s3cret"})
    try:
        status, got = s.upload(image.read_bytes(), headers={"Authorization": "Bearer s3cret"}, k="4")
        assert status == 200 and [str(data / n["path"]) for n in got["neighbours"]] == [n["path"] for n in want]
        assert [n["score"] for n in got["neighbours"]] == pytest.approx([n["score"] for n in want], abs=1e-5)
        assert "token" in one_error(*s.upload(image.read_bytes(), k="4"), 401)
        status, answer = s.json("GET", "/indexes")
        assert "token" in one_error(status, answer, 401)
        assert one_error(*s.json("GET", "/indexes", headers={"Authorization": "Bearer wrong"}), 401)
        assert s.json("GET", "/indexes", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert s.json("GET", "/indexes", headers={"Authorization": "bearer s3cret"})[0] == 200  # the scheme is any case
        assert s.request("GET", "/image/demo-index/0")[0] == 401
        assert s.request("GET", "/healthz")[0] == 200 and s.request("GET", "/")[0] == 200  # no data in either
    finally:
        s.stop()


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    return (browser, driver) if browser and Path(driver).exists() else None


needs_chromium = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")


@pytest.fixture
def browser():
    """Headless chromium driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def thumbnails_loaded(driver) -> bool:
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, "#results img")
    return bool(images) and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                                for img in images)


@needs_chromium
def test_the_page_in_a_real_browser(server, collection, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    data, _ = collection
    driver = browser
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "Ready.")
    assert Select(driver.find_element(By.ID, "index")).first_selected_option.get_attribute("value") == "demo-index"
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys("4")
    image = data / "images" / "img0007.png"
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 4)
    shown = [(e.find_element(By.CLASS_NAME, "label").text, e.find_element(By.CLASS_NAME, "domain").text,
              float(e.find_element(By.CLASS_NAME, "score").text), int(e.get_attribute("data-row")))
             for e in driver.find_elements(By.CSS_SELECTOR, "#results .result")]
    status, answer = server.upload(image.read_bytes(), k="4")
    assert [(n["label"], n["domain"], round(n["score"], 4), n["row"]) for n in answer["neighbours"]] == shown
    wait.until(thumbnails_loaded)
    # a click on a result searches by it: that row comes first, as itself
    second = driver.find_elements(By.CSS_SELECTOR, "#results .result")[1]
    row = int(second.get_attribute("data-row"))
    second.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result")[0].get_attribute("data-row") == str(row))
    assert float(driver.find_elements(By.CSS_SELECTOR, "#results .score")[0].text) > 0.999
    # a bad upload: one line on the page, the grid kept
    bad = data / "not-an-image.png"
    bad.write_bytes(b"hello")
    driver.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: "not an image" in d.find_element(By.ID, "status").text)
    assert driver.find_element(By.ID, "status").get_attribute("class") == "error"
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "not-an-image" not in e["message"]
                and "400" not in e["message"]]
    # the API's page, with its scripts from the service itself
    driver.get(server.url + "/docs")
    wait.until(lambda d: "/search" in [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")])


@needs_chromium
def test_the_page_asks_for_the_token_and_sends_it(collection, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data, index = collection
    s = Server("--index", index, "--token", "s3cret")
    try:
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "token" in d.find_element(By.ID, "status").text)  # /indexes answered 401
        box = browser.find_element(By.ID, "token")
        assert box.is_displayed()
        box.send_keys("s3cret")
        browser.find_element(By.ID, "k").click()  # leaving the box commits it
        wait.until(lambda d: d.find_element(By.ID, "status").text == "Ready.")
        browser.find_element(By.ID, "file").send_keys(str(data / "images" / "img0002.png"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 10)
        wait.until(thumbnails_loaded)  # fetched with the token: an <img> alone could not send it
        assert browser.find_elements(By.CSS_SELECTOR, "#results .result")[0].get_attribute("data-row") == "2"
    finally:
        s.stop()
