"""``featcache export``: a trained run as one model file, the form the suffix of ``out`` names.

- ``.pt``: TorchScript. Input (B, 3, H, W) RGB, float 0..255 or uint8, any H and W; the module does the
  backbone's eval preprocessing itself (``preprocess.Preprocess``), runs backbone and head, and returns
  (B, E) L2-normalised embeddings: the GUIEC submission contract. ``torch.jit.load`` alone runs it.
- ``.zip``: the GUIEC submission, a zip holding that module as ``saved_model.pt`` (E <= 64).
- ``.onnx``: backbone and head on the preprocessed (B, 3, S, S) input (dynamic batch), L2-normalised,
  with ``NAME.preprocess.json`` beside it (named after the model: two exports in one folder keep their own).

Every file records what it was exported from (``featcache.json`` inside the TorchScript archive, the
ONNX model's ``metadata_props``): the run, and the feature space its embeddings are in (the head by its
sha256). An existing file is replaced only when featcache exported it and ``overwrite`` is given.

The backbone and head are traced on a (2, 3, S, S) batch (the model's own code, any open_clip or timm
architecture); the preprocessing is scripted (it branches on the input's size). Every export ends with
a self-check against the eager pipeline on a probe image.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from featcache import __version__
from featcache.deploy.embedder import DeployError, Embedder
from featcache.deploy.preprocess import Preprocess, plan
from featcache.files import check_file_replaceable, exclusive, is_featcache_json, strict_json, write_file
from featcache.storage import absolute

FORMATS = (".pt", ".zip", ".onnx")
GUIEC_MAX_DIM = 64
SUBMISSION_NAME = "saved_model.pt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
META_FILE = "featcache.json"  # inside the TorchScript archive: what was exported, from which run


class ExportedEmbedder(nn.Module):
    """Raw images -> L2-normalised embeddings: preprocessing, then the traced backbone + head."""

    def __init__(self, preprocess: Preprocess, encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.preprocess = preprocess
        self.encoder = encoder
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype))  # the encoder's weight dtype

    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images).to(self.dtype_probe.dtype)
        return F.normalize(self.encoder(x).float(), dim=1)


class NormalisedEncoder(nn.Module):
    """The ONNX graph: preprocessed input -> L2-normalised embeddings."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.encoder(x).float(), dim=1)


@dataclass
class ExportResult:
    path: Path
    format: str
    bytes: int
    dim: int
    check: dict[str, Any]  # the self-check: what was compared and how close


def probe_image(width: int = 301, height: int = 187) -> Image.Image:
    """A deterministic picture with structure at every scale (gradients, stripes, noise), not square."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    r = 255 * x / width
    g = 127.5 + 127.5 * np.sin(x / 7.0) * np.cos(y / 11.0)
    b = 255 * ((x // 16 + y // 16) % 2) * 0.6 + rng.uniform(0, 100, (height, width))
    return Image.fromarray(np.clip(np.stack([r, g, b], axis=2), 0, 255).astype(np.uint8), "RGB")


def image_tensor(images: list[Image.Image]) -> Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float 0..255, the exported module's input."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).float()


def _traced_encoder(embedder: Embedder, size: int, dtype: torch.dtype, device: str) -> torch.jit.ScriptModule:
    encoder = embedder.encoder()
    if dtype != torch.float32:
        encoder = copy.deepcopy(encoder).to(dtype)
    example = torch.zeros(2, 3, size, size, dtype=dtype, device=device)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in model code
        return torch.jit.trace(encoder.eval(), example, check_trace=False)


def build_module(embedder: Embedder, precision: str = "fp32") -> torch.jit.ScriptModule:
    """The TorchScript module of a run's embedder (see the module docstring)."""
    dtype = DTYPES[precision]
    p = plan(embedder.cache_meta["preprocessing"])
    preprocess = Preprocess(p).to(embedder.device)
    module = ExportedEmbedder(preprocess, _traced_encoder(embedder, p["size"][0], dtype, embedder.device), dtype)
    return torch.jit.script(module.to(embedder.device))


def export_metadata(embedder: Embedder, fmt: str, precision: str) -> dict[str, Any]:
    run = embedder.run
    return {
        "featcache_version": __version__,
        "format": fmt,
        "precision": precision,
        "run": absolute(run.path, resolve=True) if run else None,  # provenance; `space` is what is checked
        "space": embedder.space(),
        "cache_key": run.cache_key if run else embedder.cache_meta["key"],
        "backbone": embedder.cache_meta["backbone"],
        "preprocessing": plan(embedder.cache_meta["preprocessing"]),
        "embed_dim": embedder.dim,
        "input": "(B, 3, H, W) RGB, float 0..255 or uint8, any H and W" if fmt != ".onnx"
                 else "(B, 3, S, S) float: (pixel / 255 - mean) / std after the resize and crop in NAME.preprocess.json",
        "output": "(B, E) float32, L2-normalised",
    }


def _save_torchscript(module: torch.jit.ScriptModule, meta: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={META_FILE: json.dumps(meta, indent=2)})
    return buf.getvalue()


def sidecar(out: Path) -> Path:
    """The preprocessing record beside an ONNX export, named after it: ``model.onnx`` -> ``model.preprocess.json``."""
    return out.with_name(f"{out.stem}.preprocess.json")


def is_export(path: Path) -> bool:
    """A model file featcache exported (its own record inside), so one it may replace."""
    if path.suffix.lower() == ".onnx":  # or, exported before ONNX files carried the record, one with its old sidecar
        return onnx_metadata(path) is not None or is_featcache_json(path.with_name("preprocess.json"))
    try:
        read_export_metadata(path)
    except DeployError:
        return False
    return True


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, weights=None, device: str = "cpu",
           precision: str = "fp32", overwrite: bool = False) -> ExportResult:
    """Export a finished run to ``out`` (.pt, .zip or .onnx); refuses before writing anything when the run,
    its cache or the weights do not check out, or when ``out`` (or an ONNX model's preprocessing file) is
    there and is not a featcache export, or is one and ``overwrite`` is not given. Returns the file's size
    and the self-check."""
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise DeployError(f"--out {out}: the suffix picks the format, one of {', '.join(FORMATS)}")
    if precision not in DTYPES or (fmt == ".onnx" and precision != "fp32"):
        allowed = "fp32 (ONNX)" if fmt == ".onnx" else ", ".join(DTYPES)
        raise DeployError(f"--precision {precision}: expected {allowed}")
    with exclusive(out, "a model export", remove=True):
        check_file_replaceable(out, is_export, "a model export", overwrite, "--out")
        if fmt == ".onnx":
            check_file_replaceable(sidecar(out), is_featcache_json, f"{out.name}'s preprocessing", overwrite, "--out")
        return _export(run_dir, out, fmt, weights, device, precision)


def _export(run_dir, out: Path, fmt: str, weights, device: str, precision: str) -> ExportResult:
    embedder = Embedder.from_run(run_dir, weights, device)
    if fmt == ".zip" and embedder.dim > GUIEC_MAX_DIM:
        raise DeployError(f"--out {out}: a GUIEC submission takes embeddings of at most {GUIEC_MAX_DIM} dims; "
                          f"this run's head gives {embedder.dim}")
    meta = export_metadata(embedder, fmt, precision)
    checks: dict[str, Any] = {}
    # Each file is written beside `out` and checked before it is renamed into place: a failed check
    # leaves nothing behind.
    if fmt == ".onnx":
        def write_onnx(tmp: Path) -> None:
            _write_onnx(embedder, tmp, meta)
            checks.update(check_onnx(tmp, embedder))
            # the model is made and checked; its preprocessing goes into place just before it does
            write_file(sidecar(out), lambda side: side.write_text(strict_json(meta) + "\n"))

        write_file(out, write_onnx)
    else:
        data = _save_torchscript(build_module(embedder, precision), meta)
        checks.update(check_torchscript(torch.jit.load(io.BytesIO(data), map_location="cpu"), embedder, precision))
        if fmt == ".pt":
            write_file(out, lambda tmp: tmp.write_bytes(data))
        else:
            def write_zip(tmp: Path) -> None:
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                    z.writestr(SUBMISSION_NAME, data)
            write_file(out, write_zip)
    return ExportResult(out, fmt, out.stat().st_size, embedder.dim, checks)


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """An exported module from a .pt file, or from the ``saved_model.pt`` inside a submission .zip."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as z:
            return torch.jit.load(io.BytesIO(z.read(SUBMISSION_NAME)), map_location="cpu")
    return torch.jit.load(str(path), map_location="cpu")


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What ``export`` recorded inside a .pt file (or a submission .zip): run, cache key, backbone, plan.
    Read from the archive as data (a TorchScript file is a zip; its extra files sit in ``*/extra/``): no
    code in the file is loaded or run to read it."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
        if path.suffix.lower() == ".zip":
            archive = zipfile.ZipFile(io.BytesIO(archive.read(SUBMISSION_NAME)))
        name = next((n for n in archive.namelist() if n.endswith(f"/extra/{META_FILE}")), None)
        if name is None:
            raise DeployError(f"{path}: not a featcache export (no {META_FILE} inside)")
        return json.loads(archive.read(name))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, RuntimeError, NotImplementedError) as e:
        raise DeployError(f"{path}: not a featcache export ({type(e).__name__}: {e})") from None


@torch.inference_mode()
def check_torchscript(module: torch.jit.ScriptModule, embedder: Embedder, precision: str = "fp32") -> dict[str, Any]:
    """The export on a probe image against the eager pipeline (PIL preprocessing, backbone, head, L2)."""
    image = probe_image()
    expected = embedder.embed_images([image])
    got = module.to(embedder.device)(image_tensor([image]).to(embedder.device)).float().cpu().numpy()
    cosine = float((expected * got).sum())
    floor = 0.995 if precision == "fp32" else 0.98
    if not cosine >= floor:
        raise DeployError(f"self-check failed: the export's embedding of a probe image has cosine {cosine:.4f} "
                          f"to the pipeline's (expected >= {floor})")
    return {"probe": f"{image.width}x{image.height} synthetic image", "cosine": round(cosine, 6), "floor": floor}


def onnx_metadata(path: Path) -> dict[str, Any] | None:
    """What ``export`` recorded in an ONNX model's ``metadata_props``; None for any other file."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        text = next((p.value for p in model.metadata_props if p.key == META_FILE), None)
        return json.loads(text) if text else None
    except Exception:  # not ONNX at all: protobuf's decode errors, or garbage in our own field
        return None


def _write_onnx(embedder: Embedder, tmp: Path, meta: dict[str, Any]) -> None:
    size = plan(embedder.cache_meta["preprocessing"])["size"][0]
    model = NormalisedEncoder(embedder.encoder()).eval()
    example = torch.zeros(2, 3, size, size, device=embedder.device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX form; the plain ops give the same numbers.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["pixels"],
                              output_names=["embedding"], dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
                              opset_version=17)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    import onnx

    model = onnx.load(str(tmp))
    model.metadata_props.add(key=META_FILE, value=json.dumps(meta))
    onnx.save(model, str(tmp))


@torch.inference_mode()
def check_onnx(path: Path, embedder: Embedder) -> dict[str, Any]:
    """onnxruntime on the preprocessed probe image against torch's own output, within 1e-4."""
    import onnxruntime

    x = embedder.backbone.transform(probe_image())[None]
    expected = NormalisedEncoder(embedder.encoder())(x.to(embedder.device)).cpu().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= 1e-4:
        raise DeployError(f"self-check failed: onnxruntime differs from torch by {diff:.2e} on a probe image (> 1e-4)")
    return {"probe": "synthetic image, preprocessed", "max_abs_diff": diff, "floor": 1e-4}
