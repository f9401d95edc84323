from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int, size=(48, 40), seed: int = 0, ext: str = "png") -> list[str]:
    """n small real images with distinct random content; returns their names relative to ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = size
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"img{i:04d}.{ext}"
        Image.fromarray(pixels).save(folder / name, quality=95) if ext == "jpg" else Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def image_manifest(tmp: Path, n: int = 20, *, size=(48, 40), ext: str = "png", classes: int = 4) -> Path:
    names = write_images(tmp / "images", n, size=size, ext=ext)
    splits = ["train", "query", "index"]
    rows = [[f"images/{name}", i % classes, f"d{i % 2}", splits[i % 3]] for i, name in enumerate(names)]
    return write_csv(tmp / "m.csv", ["path", "label", "domain", "split"], rows)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A checkpoint of the tiny open_clip model with weights that differ from its seeded random init."""
    import open_clip
    import torch

    from featcache.extract.backbones.open_clip_models import register_local_configs

    register_local_configs()
    torch.manual_seed(1234)
    model = open_clip.create_model("featcache-tiny-vit")
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def cli():
    from featcache.cli import app

    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == code, f"exit {result.exit_code}, expected {code}\n{result.output}"
        return result

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def make_cache(tmp: Path, features: np.ndarray, labels, splits=None, domains=None, name: str = "c") -> Path:
    """A real cache on disk holding exactly ``features`` (float32), built through ``featcache import``'s library call."""
    from featcache.cache import import_features
    from featcache.manifest import read_manifest, write_manifest

    n = len(features)
    m = write_manifest(tmp / f"{name}.csv", [f"img{i:05d}.png" for i in range(n)], [str(x) for x in labels],
                       domains=None if domains is None else list(domains), splits=None if splits is None else list(splits))
    out = tmp / f"{name}.zarr"
    import_features(np.asarray(features, dtype=np.float32), read_manifest(m), out, source=f"{name}.npy",
                    source_sha256="0" * 64, dtype="float32")
    return out


def blobs(classes: int, per_class: int, dim: int = 32, noise: float = 0.5, seed: int = 0):
    """Separable synthetic features: one random centre per class plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: a real full disk (skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto's, in a thread) on 127.0.0.1 and a free port: nothing reaches a network."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A new empty bucket on the test server, as ``s3://BUCKET``; the environment points every S3 client
    (this process's and the subprocesses' it starts) at the server, with test credentials and no profile."""
    import uuid

    from featcache import storage

    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "featcache-test",
                        "AWS_SECRET_ACCESS_KEY": "featcache-test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(storage.OPTIONS_ENV, raising=False)
    monkeypatch.setattr(storage, "SETTINGS", storage.Settings())
    bucket = f"featcache-{uuid.uuid4().hex[:12]}"
    storage.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}"
