"""Stage two speed: one epoch of `featcache.train.loop.train` against its bare matmul floor, in one run.

A synthetic cache of M4D-35k's shape is built in memory: 328,400 rows x 1152 dims float16 over 34,800
classes (long-tailed class sizes, every class >= 3 rows); ``--scale S`` shrinks rows AND classes by S.
Features are class means plus noise, so the loss really decreases (checked on a fixed probe batch before
and after the epoch). For every loss and batch size, one epoch of ``train(data, options, out=None)``
(epochs 1, warm-up 0) is timed, interleaved --repeat times (default 3, minimum kept) with the floor for
the same shapes and step count:

  per step   head Linear(1152 -> 64): forward + weight gradient          (fp32, as in train)
             normalised (B x E) @ (E x C*k): the class-logit forward       (--precision)
             grad wrt embeddings (B x C*k) @ (C*k x E), grad wrt weights (C*k x B) @ (B x E)

matmuls alone, into preallocated outputs. The ratio epoch / floor is the figure of merit (goal: <= 1.5
at batch 1024). An "adam" column times Adam's update of the same parameters for the same steps: it is
not in the floor, but it is work every step must do. The peak RSS of each training epoch (VmHWM,
reset just before it, so the floor's own B x C*k buffers do not count) is checked against
feature bytes + 3 x class-weight bytes + 1 GB.

    uv run python benchmarks/train_head.py [--scale 1.0] [--losses ...] [--batch-sizes 128 1024]
                                           [--device cuda|cpu] [--precision fp32|bf16] [--sub-centers 3]
                                           [--repeat 3] [--threads N] [--json] [--profile]

On an H200, the paper's loss at full size:

    uv run python benchmarks/train_head.py --device cuda --precision bf16 --losses subcenter-arcface
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine_facts, peak_rss_bytes, reset_peak_rss, sync  # noqa: E402  (benchmarks/machine.py)

from featcache.train.loop import TrainData, TrainOptions, build_model, make_optimizer, train  # noqa: E402
from featcache.train.losses import loss_names  # noqa: E402

FULL_ROWS = 328_400
FULL_CLASSES = 34_800
DIM = 1152
EMBED = 64
GOAL_RATIO = 1.5
GOAL_BATCH = 1024
GB = 10**9


# ------------------------------------------------------------------------------------------ machine


# ------------------------------------------------------------------------------------------ data


def class_sizes(rows: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed sizes, each >= 3, summing to ``rows`` (lognormal weights for the rows above 3)."""
    if rows < 3 * classes:
        raise SystemExit(f"{rows} rows cannot give {classes} classes >= 3 rows each")
    w = rng.lognormal(0.0, 1.5, classes)
    return 3 + rng.multinomial(rows - 3 * classes, w / w.sum())


def synthetic_data(rows: int, classes: int, device: torch.device, seed: int, noise: float,
                   block_classes: int = 2048) -> TrainData:
    """Class means + Gaussian noise, float16, built a block of classes at a time (small temporaries)."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(rows, classes, rng)
    labels = np.repeat(np.arange(classes), sizes)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.empty(rows, DIM, dtype=torch.float16)
    lo = 0
    for c0 in range(0, classes, block_classes):
        s = torch.from_numpy(sizes[c0:c0 + block_classes])
        means = torch.randn(len(s), DIM, generator=gen)
        n = int(s.sum())
        block = means.repeat_interleave(s, dim=0)
        block.add_(torch.randn(n, DIM, generator=gen), alpha=noise)
        feats[lo:lo + n] = block.half()
        lo += n
    return TrainData(
        features=feats.to(device),
        labels=torch.from_numpy(labels.astype(np.int64)).to(device),
        classes=[str(c) for c in range(classes)],
        cache_path=Path("<synthetic>"),
        cache_key="synthetic",
        backbone="synthetic",
        skipped_invalid=0,
    )


# ------------------------------------------------------------------------------------------ floor


def step_sizes(n: int, batch: int) -> list[int]:
    return [min(batch, n - i) for i in range(0, n, batch)]


def floor_seconds(n: int, batch: int, ck: int, device: torch.device, precision: str, warmup: int = 2) -> float:
    """The matmuls of one epoch alone (see the module docstring), same step count and batch sizes."""
    g = torch.Generator(device=device).manual_seed(0)
    mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(batch, DIM, device=device, generator=g)  # features after .float()
    w1 = torch.randn(EMBED, DIM, device=device, generator=g) * DIM**-0.5
    wc = F.normalize(torch.randn(ck, EMBED, device=device, generator=g), dim=1).to(mm_dtype)
    grad_logits = (torch.randn(batch, ck, device=device, generator=g) * 1e-3).to(mm_dtype)
    emb = torch.empty(batch, EMBED, device=device)
    logits = torch.empty(batch, ck, device=device, dtype=mm_dtype)
    g_emb = torch.empty(batch, EMBED, device=device, dtype=mm_dtype)
    g_wc = torch.empty(ck, EMBED, device=device, dtype=mm_dtype)
    g_w1 = torch.empty(EMBED, DIM, device=device)

    def step(b: int) -> None:
        torch.mm(x[:b], w1.t(), out=emb[:b])  # head forward
        e = F.normalize(emb[:b], dim=1).to(mm_dtype)
        torch.mm(e, wc.t(), out=logits[:b])  # class logits
        torch.mm(grad_logits[:b], wc, out=g_emb[:b])  # d loss / d embeddings
        torch.mm(grad_logits[:b].t(), e, out=g_wc)  # d loss / d class weights
        torch.mm(g_emb[:b].float().t(), x[:b], out=g_w1)  # head weight gradient

    sizes = step_sizes(n, batch)
    for _ in range(warmup):
        step(batch)
    sync(device)
    t = time.perf_counter()
    for b in sizes:
        step(b)
    sync(device)
    return time.perf_counter() - t


def adam_seconds(steps: int, ck: int, device: torch.device, weight_decay: float) -> float:
    """train's optimiser (fused Adam, coupled weight decay) over the head and class weights, ``steps`` updates."""
    params = [torch.zeros(EMBED, DIM, device=device, requires_grad=True),
              torch.zeros(EMBED, device=device, requires_grad=True),
              torch.zeros(ck, EMBED, device=device, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(params, TrainOptions(lr=1e-3, weight_decay=weight_decay))
    opt.step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------ train


def probe_loss(head, loss_fn, data: TrainData, rows: torch.Tensor, block: int = 256) -> float:
    """Mean loss (eval mode: no dropout, no running-statistic updates) over fixed rows."""
    head.eval()
    loss_fn.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), block):
            idx = rows[i:i + block]
            total += float(loss_fn(head(data.features[idx].float()), data.labels[idx])) * len(idx)
    return total / len(rows)


def options_for(loss: str, batch: int, a) -> TrainOptions:
    loss_opts = {"sub_centers": a.sub_centers} if loss == "subcenter-arcface" else {}
    return TrainOptions(loss=loss, loss_opts=loss_opts, epochs=1, warmup_epochs=0.0, batch_size=batch,
                        device=a.device, precision=a.precision)


def run_one(loss: str, batch: int, data: TrainData, probe_rows: torch.Tensor, dev: torch.device, a) -> dict:
    options = options_for(loss, batch, a)
    # The same seeded build as train() starts from: setup time and the loss before training.
    t = time.perf_counter()
    head0, loss0 = build_model(options, data)
    make_optimizer([*head0.parameters(), *loss0.parameters()], options)
    sync(dev)
    setup_s = time.perf_counter() - t
    before = probe_loss(head0, loss0, data, probe_rows)
    ck = loss0.num_classes * loss0.sub_centers
    del head0, loss0

    n = len(data.labels)
    steps = math.ceil(n / batch)
    floors, adams, epochs, reported, walls, peaks, gpu_peaks = [], [], [], [], [], [], []
    for _ in range(a.repeat):  # interleaved, so that a burst of load hits both sides alike
        floors.append(floor_seconds(n, batch, ck, dev, a.precision))
        adams.append(adam_seconds(steps, ck, dev, options.weight_decay))
        sync(dev)
        reset_peak_rss()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        result = train(data, options, out=None)
        sync(dev)
        wall_s = time.perf_counter() - t
        peaks.append(peak_rss_bytes())
        if dev.type == "cuda":
            gpu_peaks.append(torch.cuda.max_memory_allocated(dev))
        metrics = result.metrics[0]
        # train() reads its clock before the epoch's last kernels finish on a GPU: never count less
        # than the synchronised wall time minus the (separately timed) setup.
        epochs.append(max(metrics["seconds"], wall_s - setup_s))
        reported.append(metrics["seconds"])
        walls.append(wall_s)
    after = probe_loss(result.head, result.loss, data, probe_rows)
    # Noise on a shared machine only adds time: the minimum of the repeats is the estimate.
    epoch_s, floor_s, adam_s = min(epochs), min(floors), min(adams)
    return {
        "loss": loss,
        "batch_size": batch,
        "steps": steps,
        "class_rows": ck,
        "epoch_s": round(epoch_s, 4),
        "epoch_s_all": [round(x, 4) for x in epochs],
        "floor_s_all": [round(x, 4) for x in floors],
        "epoch_s_reported_all": reported,
        "train_wall_s_all": [round(x, 4) for x in walls],
        "setup_s": round(setup_s, 4),
        "floor_s": round(floor_s, 4),
        "adam_s": round(adam_s, 4),
        "ratio": round(epoch_s / floor_s, 3),
        "ratio_floor_plus_adam": round(epoch_s / (floor_s + adam_s), 3),
        "rows_per_s": round(n / epoch_s, 1),
        "probe_loss_before": round(before, 4),
        "probe_loss_after": round(after, 4),
        "epoch_loss": metrics["loss"],
        "train_acc": metrics["train_acc"],
        "train_peak_rss_bytes": max(peaks),
        "train_peak_gpu_bytes": max(gpu_peaks) if gpu_peaks else None,
    }


def profile_one(loss: str, batch: int, data: TrainData, a, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        train(data, options_for(loss, batch, a), out=None)
        sync(torch.device(a.device))
    key = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
    print(f"profile: one epoch of {loss} at batch {batch}, top {rows} ops by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40))


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="shrink rows AND classes by this factor")
    p.add_argument("--losses", nargs="+", default=None, help="losses to time (default: all registered)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 1024])
    p.add_argument("--epochs", type=int, default=1, choices=[1], help="one epoch is timed (fixed)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="class-logit matmul precision (train's --precision)")
    p.add_argument("--sub-centers", type=int, default=3, help="k for subcenter-arcface")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved floor/epoch measurements per loss and batch size; the minimum of each is used")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--noise", type=float, default=1.0, help="feature noise around the class means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after the runs, profile one more epoch of the first loss at the largest batch")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    a = p.parse_args(argv)

    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA GPU is visible to torch")
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not 0 < a.scale <= 1:
        p.error("--scale must be in (0, 1]")
    losses = a.losses or loss_names()
    unknown = [x for x in losses if x not in loss_names()]
    if unknown:
        p.error(f"unknown loss(es) {', '.join(unknown)}; valid: {', '.join(loss_names())}")

    facts = machine_facts(a.device)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"cwd: {os.getcwd()}")
    print(f"machine: cpu_count={facts['cpu_count']} ({facts['cpu']}), torch {facts['torch']} "
          f"({facts['torch_threads']} threads), python {facts['python']}, device {a.device} = "
          f"{facts['device_name']}, load avg {facts['load_avg_1m']}")

    rows = max(3 * 2, round(FULL_ROWS * a.scale))
    classes = max(2, round(FULL_CLASSES * a.scale))
    rss_start = peak_rss_bytes()
    can_reset = reset_peak_rss()
    t = time.perf_counter()
    data = synthetic_data(rows, classes, dev, a.seed, a.noise)
    counts = data.class_counts()
    print(f"data: {rows:,} rows x {DIM} float16 ({data.features.numel() * 2 / 1e6:.0f} MB), {classes:,} classes "
          f"(sizes min {counts.min()}, median {int(np.median(counts))}, max {counts.max()}), scale {a.scale}, "
          f"built in {time.perf_counter() - t:.1f} s; precision {a.precision}, sub-centers {a.sub_centers}")
    rss_data = peak_rss_bytes()
    probe_rows = torch.randperm(rows, generator=torch.Generator().manual_seed(1))[:1024].to(dev)

    results = []
    for loss in losses:
        for batch in a.batch_sizes:
            r = run_one(loss, batch, data, probe_rows, dev, a)
            results.append(r)
            print(f"  {loss:<18} batch {batch:>5}: epoch {r['epoch_s']:.2f} s (runs {r['epoch_s_all']}), "
                  f"floor {r['floor_s']:.2f} s (runs {r['floor_s_all']}), "
                  f"ratio {r['ratio']:.2f}, probe loss {r['probe_loss_before']:.3f} -> {r['probe_loss_after']:.3f}",
                  flush=True)

    k_max = max(a.sub_centers if x == "subcenter-arcface" else 1 for x in losses)
    feature_bytes = data.features.numel() * data.features.element_size()
    class_weight_bytes = classes * k_max * EMBED * 4
    bound = feature_bytes + 3 * class_weight_bytes + GB
    for r in results:  # each loss against the bound of its own class weights (C·k rows)
        r["rss_bound_bytes"] = feature_bytes + 3 * r["class_rows"] * EMBED * 4 + GB
        r["rss_holds"] = r["train_peak_rss_bytes"] <= r["rss_bound_bytes"] if can_reset else None
    # Without a resettable peak, the process peak is all there is (it includes the floor's buffers).
    peak = max(r["train_peak_rss_bytes"] for r in results) if can_reset else peak_rss_bytes()
    memory = {
        "feature_bytes": feature_bytes,
        "class_weight_bytes": class_weight_bytes,
        "k_max": k_max,
        "bound_bytes": bound,
        "peak_rss_bytes": peak,
        "peak_is_training_only": can_reset,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_data_bytes": rss_start,
        "rss_after_data_bytes": rss_data,
        "holds": all(r["rss_holds"] for r in results) if can_reset else peak <= bound,
    }
    if dev.type == "cuda":
        memory["peak_gpu_bytes"] = max(r["train_peak_gpu_bytes"] for r in results)
        memory["gpu_holds"] = memory["peak_gpu_bytes"] <= bound
    res = {
        "command": shlex.join(sys.orig_argv),
        "machine": facts,
        "scale": a.scale,
        "rows": rows,
        "classes": classes,
        "dim": DIM,
        "embed_dim": EMBED,
        "precision": a.precision,
        "sub_centers": a.sub_centers,
        "repeat": a.repeat,
        "results": results,
        "memory": memory,
        "goal": {"ratio": GOAL_RATIO, "batch_size": GOAL_BATCH},
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    report(res)
    if a.profile:
        profile_one(losses[0], max(a.batch_sizes), data, a)
    if a.json:
        print(json.dumps(res))
    return res


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"train-head, one epoch: {res['rows']:,} rows x {res['dim']} -> {res['embed_dim']}, "
                    f"{res['classes']:,} classes (scale {res['scale']}), {res['machine']['device']}, "
                    f"precision {res['precision']}, min of {res['repeat']} runs",
              title_justify="left", header_style="bold")
    cols = ["loss", "batch", "steps", "C*k", "epoch s", "floor s", "epoch/floor", "adam s", "epoch/(floor+adam)",
            "rows/s", "probe loss before -> after", "train acc", "peak RSS MB / bound"]
    for c in cols:
        t.add_column(c, justify="left" if c == "loss" else "right")
    for r in res["results"]:
        mark = ""
        if r["batch_size"] == res["goal"]["batch_size"]:
            mark = " ok" if r["ratio"] <= res["goal"]["ratio"] else " !"
        t.add_row(r["loss"], str(r["batch_size"]), str(r["steps"]), f"{r['class_rows']:,}", f"{r['epoch_s']:.2f}",
                  f"{r['floor_s']:.2f}", f"{r['ratio']:.2f}{mark}", f"{r['adam_s']:.2f}",
                  f"{r['ratio_floor_plus_adam']:.2f}", f"{r['rows_per_s']:,.0f}",
                  f"{r['probe_loss_before']:.3f} -> {r['probe_loss_after']:.3f}", f"{r['train_acc']:.3f}",
                  f"{r['train_peak_rss_bytes'] / 1e6:,.0f} / {r['rss_bound_bytes'] / 1e6:,.0f}"
                  + {True: " ok", False: " !", None: ""}[r["rss_holds"]])
    console = Console(width=180)
    console.print(t)
    m = res["memory"]
    print(f"goal: epoch/floor <= {res['goal']['ratio']} at batch {res['goal']['batch_size']} "
          f"('ok' met, '!' missed)")
    what = "training epochs" if m["peak_is_training_only"] else "whole process, floor buffers included"
    print(f"memory: peak RSS {m['peak_rss_bytes'] / 1e6:,.0f} MB ({what}; after building the data "
          f"{m['rss_after_data_bytes'] / 1e6:,.0f} MB); bound = features {m['feature_bytes'] / 1e6:,.0f} MB "
          f"+ 3 x class weights ({m['class_weight_bytes'] / 1e6:,.1f} MB at k = {m['k_max']}; each loss "
          f"its own in the table) + 1 GB = {m['bound_bytes'] / 1e6:,.0f} MB: {'holds' if m['holds'] else 'EXCEEDED'}")
    if "peak_gpu_bytes" in m:
        print(f"GPU: peak allocated {m['peak_gpu_bytes'] / 1e6:,.0f} MB against the same bound: "
              f"{'holds' if m['gpu_holds'] else 'EXCEEDED'}")
    print(f"load avg at end {res['load_avg_1m_end']}")


if __name__ == "__main__":
    main()
