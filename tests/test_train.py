import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from featcache.train.loop import TrainOptions, load_train_data, lr_at, train
from featcache.train.runs import Run
from tests.conftest import blobs, make_cache


@pytest.fixture
def small_cache(tmp_path):
    x, y = blobs(6, 20, dim=32)
    splits = ["train" if c < 4 else ("query" if i % 4 == 0 else "index") for i, c in enumerate(y)]
    return make_cache(tmp_path, x, y, splits)


def head_weights(run_dir):
    return load_file(str(run_dir / "head.safetensors"))


def test_train_head_writes_a_complete_run(tmp_path, small_cache, cli):
    out = tmp_path / "run"
    res = cli("train-head", "--cache", small_cache, "--epochs", "3", "--batch-size", "16", "--out", out, "--json")
    report = json.loads(res.stdout)
    assert report["complete"] and report["train_rows"] == 80 and report["classes"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["complete"] is True and config["epochs_done"] == 3
    assert config["cache"]["key"] == json.loads((small_cache / "zarr.json").read_text())["attributes"]["featcache"]["key"]
    o = config["options"]
    assert o["loss"] == "subcenter-arcface" and o["loss_opts"]["sub_centers"] == 3 and o["loss_opts"]["margin"] == 0.5
    assert o["loss_opts"]["scale"] == 30 and o["lr"] == 2e-2 and o["weight_decay"] == 1e-4 and o["seed"] == 42
    assert o["embed_dim"] == 64 and o["dropout"] == 0.2 and config["featcache_version"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert all({"loss", "lr", "seconds", "train_acc"} <= set(m) for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    cw = load_file(str(out / "class_weights.safetensors"))
    assert cw["weight"].shape == (4 * 3, 64)
    assert not (out / "state.pt").exists()
    # the head in Python, checked against the saved matrices applied by hand (dropout is off at inference)
    w = head_weights(out)
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    np.testing.assert_allclose(Run.load(out).embed(x), x @ w["net.1.weight"].T + w["net.1.bias"], rtol=1e-5, atol=1e-5)


def test_same_seed_same_head_and_other_seed_other_head(tmp_path, small_cache):
    data = load_train_data(small_cache)
    runs = [train(data, TrainOptions(epochs=2, batch_size=16, seed=s), tmp_path / f"r{i}") for i, s in enumerate([7, 7, 8])]
    a, b, c = (head_weights(tmp_path / f"r{i}") for i in range(3))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["net.1.weight"], c["net.1.weight"])
    assert runs[0].metrics[-1]["loss"] == runs[1].metrics[-1]["loss"]


def test_interrupt_keeps_last_epoch_and_resume_matches_uninterrupted(tmp_path, small_cache):
    data = load_train_data(small_cache)
    options = TrainOptions(epochs=4, batch_size=16, sample_classes=0.5, seed=3)
    train(data, options, tmp_path / "full")

    def stop_in_epoch_3(info):
        if info.epoch == 2 and info.step == 1:
            raise KeyboardInterrupt

    part = train(data, options, tmp_path / "part", on_step=stop_in_epoch_3)
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert not part.complete and config["complete"] is False and config["epochs_done"] == 2
    Run.load(tmp_path / "part").embed(np.zeros((1, 32), dtype=np.float32))  # a usable head
    resumed = train(data, options, tmp_path / "part", resume=True)
    assert resumed.complete
    full, res = head_weights(tmp_path / "full"), head_weights(tmp_path / "part")
    assert all(np.array_equal(full[k], res[k]) for k in full)
    assert (tmp_path / "full" / "metrics.jsonl").read_text().count("\n") == 4
    full_m = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part_m = [json.loads(x)["loss"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert full_m == part_m


def test_lr_schedule_is_linear_warmup_then_cosine():
    o = TrainOptions(lr=0.02, min_lr=0.001, warmup_epochs=1, epochs=3)
    steps, total = 10, 30
    assert lr_at(0, total, steps, o) == pytest.approx(0.002)  # (0 + 1) / 10 of the peak
    assert lr_at(9, total, steps, o) == pytest.approx(0.02)
    assert lr_at(10, total, steps, o) == pytest.approx(0.02)  # cosine starts at the peak
    mid = 10 + 10  # half way through the cosine part
    assert lr_at(mid, total, steps, o) == pytest.approx(0.001 + 0.5 * 0.019 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(29, total, steps, o) == pytest.approx(0.001 + 0.5 * 0.019 * (1 + math.cos(math.pi * 19 / 20)))


def test_dynamic_arcface_counts_come_from_training_rows_by_class_id(tmp_path):
    rng = np.random.default_rng(0)
    counts = {"c": 3, "a": 200, "b": 50}  # class ids follow sorted names: a=0, b=1, c=2
    labels = [name for name, n in counts.items() for _ in range(n)]
    rng.shuffle(labels)
    cache = make_cache(tmp_path, rng.normal(size=(len(labels), 8)), labels)
    result = train(load_train_data(cache), TrainOptions(loss="dynamic-arcface", epochs=1), None)
    # REFERENCES: m_c = m_min + (m_max - m_min)/2 * (1 + cos(pi * (n_c - n_min)/(n_max - n_min)))
    expected = [0.2 + 0.15 * (1 + math.cos(math.pi * (n - 3) / 197)) for n in (200, 50, 3)]
    np.testing.assert_allclose(result.loss.margins.numpy(), expected, rtol=1e-6)


def test_train_reaches_high_accuracy_on_separable_data(tmp_path):
    x, y = blobs(5, 40, dim=16, noise=0.3)
    cache = make_cache(tmp_path, x, y)
    for loss in ("arcface", "cosface", "softmax"):
        r = train(load_train_data(cache), TrainOptions(loss=loss, epochs=5, batch_size=32), None)
        assert r.metrics[-1]["train_acc"] > 0.95, (loss, r.metrics)


def test_losses_command_lists_all_ten(cli):
    rows = json.loads(cli("losses", "--json").stdout)
    assert [r["name"] for r in rows] == ["softmax", "normface", "cosface", "arcface", "subcenter-arcface", "dynamic-arcface",
                                         "airface", "curricularface", "adaface", "adacos"]
    by = {r["name"]: r["options"] for r in rows}
    assert by["subcenter-arcface"]["sub_centers"] == 3 and by["cosface"]["margin"] == 0.35


@pytest.mark.parametrize("args,message", [
    (["--loss", "nope"], "unknown loss 'nope'"),
    (["--sub-centers", "0"], "sub_centers"),
    (["--scale", "-1"], "scale"),
    (["--margin", "3.2"], "margin"),
    (["--loss", "softmax", "--margin", "0.3"], "margin"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "expected cpu, cuda or cuda:N"),
    (["--device", "mps"], "expected cpu, cuda or cuda:N"),
    (["--loss", "adacos", "--embed-dim", "8"], None),
    (["--loss-opt", "momentum"], "expected NAME=VALUE"),
])
def test_bad_options_stop_before_any_work(tmp_path, small_cache, cli, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    if message is None:  # adacos on a 2-class cache: its starting scale would be 0 for good
        from tests.conftest import make_cache as mk

        x, y = blobs(2, 5, dim=8)
        small_cache = mk(tmp_path, x, y, name="two")
        message = "adacos needs at least 3 classes"
    r = cli("train-head", "--cache", small_cache, "--out", out, *args, code=2)
    assert message in r.output and r.output.strip().count("\n") == 0, r.output
    assert not out.exists()


def test_bad_caches_stop_with_one_line(tmp_path, cli):
    x, y = blobs(3, 4, dim=8)
    cases = [
        (make_cache(tmp_path, x, y, ["query"] * 12, name="q"), "no valid training rows"),
        (make_cache(tmp_path, x, np.zeros(12, int), name="one"), "a single class"),
    ]
    for cache, message in cases:
        out = tmp_path / "run"
        r = cli("train-head", "--cache", cache, "--out", out, code=2)
        assert message in r.output and not out.exists()


def test_non_finite_features_are_counted(tmp_path):
    import zarr

    x, y = blobs(3, 4, dim=8)
    cache = make_cache(tmp_path, x, y)
    g = zarr.open_group(str(cache), mode="r+")
    g["features"][1, 0] = np.inf
    g["features"][5, 2] = np.nan
    with pytest.raises(ValueError, match="2 training rows have NaN or infinite features"):
        load_train_data(cache)


def test_sweep_trains_the_grid_and_scores_it(tmp_path, small_cache, cli):
    out = tmp_path / "sweep"
    res = cli("sweep", "--cache", small_cache, "--loss", "arcface", "--loss", "normface", "--margin", "0.2",
              "--margin", "0.4", "--epochs", "2", "--batch-size", "32", "--seeds", "2", "--out", out, "--json")
    summary = json.loads(res.stdout)
    zero, trained = summary["results"][:2], summary["results"][2:]
    # the baselines first, as in the paper's tables, scored as `eval --zero-shot` scores them
    for row, kind in zip(zero, ("pooled", "raw")):
        assert row["loss"] == f"zero-shot {kind}" and row["runs"] == []
        cli("eval", "--cache", small_cache, "--zero-shot", kind, "--json", tmp_path / f"{kind}.json")
        assert row["mMP@5"] == f"{json.loads((tmp_path / f'{kind}.json').read_text())['overall']['mMP@5']:.4f}"
    # arcface x 2 margins, normface has no margin: 3 combinations, 2 seeds each
    assert [(r["loss"], r["options"]["loss_opts"]) for r in trained] == [
        ("arcface", {"margin": 0.2}), ("arcface", {"margin": 0.4}), ("normface", {})]
    for r in trained:
        assert len(r["runs"]) == 2 and [x["seed"] for x in r["runs"]] == [42, 43]
        scores = [x["mMP@5"] for x in r["runs"]]
        assert r["mMP@5"] == f"{np.mean(scores):.4f} ± {np.std(scores, ddof=1):.4f}"
    assert (out / "sweep.json").is_file() and "| import | arcface | margin=0.2 |" in (out / "sweep.md").read_text()
    assert len(list(out.glob("*/head.safetensors"))) == 6 and (out / "sweep.png").is_file()


def test_sweep_over_two_caches_adds_a_backbone_column(tmp_path, cli):
    x, y = blobs(6, 20, dim=32)
    splits = ["train" if c < 4 else ("query" if i % 4 == 0 else "index") for i, c in enumerate(y)]
    a = make_cache(tmp_path, x, y, splits, name="a")
    b = make_cache(tmp_path, x[:, :16] * 2, y, splits, name="b")
    out = tmp_path / "sweep"
    summary = json.loads(cli("sweep", "--cache", a, "--cache", b, "--loss", "arcface", "--epochs", "1",
                             "--batch-size", "32", "--out", out, "--json").stdout)
    assert [(r["backbone"], r["loss"]) for r in summary["results"]] == [
        ("import (a)", "zero-shot pooled"), ("import (a)", "zero-shot raw"), ("import (a)", "arcface"),
        ("import (b)", "zero-shot pooled"), ("import (b)", "zero-shot raw"), ("import (b)", "arcface")]
    heads = sorted(out.glob("*/*/head.safetensors"))
    assert [h.parent.parent.name for h in heads] == [f"00-{tmp_path.name}-a", f"01-{tmp_path.name}-b"]  # NN-folder-cache
    assert head_weights(heads[0].parent)["net.1.weight"].shape == (64, 32)
    assert head_weights(heads[1].parent)["net.1.weight"].shape == (64, 16)
    assert (out / "sweep.png").is_file()


def test_resume_after_an_interrupt_in_the_first_epoch_starts_over(tmp_path, small_cache):
    data = load_train_data(small_cache)
    options = TrainOptions(epochs=2, batch_size=16)

    def stop_at_once(info):
        raise KeyboardInterrupt

    part = train(data, options, tmp_path / "run", on_step=stop_at_once)
    assert not part.complete and part.metrics == []
    resumed = train(data, options, tmp_path / "run", resume=True)
    train(data, options, tmp_path / "fresh")
    assert resumed.complete
    a, b = head_weights(tmp_path / "run"), head_weights(tmp_path / "fresh")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_loss_opt_names_may_use_hyphens(tmp_path, small_cache, cli):
    cli("train-head", "--cache", small_cache, "--epochs", "1", "--loss-opt", "sub-centers=2", "--out", tmp_path / "r", "--quiet")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["options"]["loss_opts"]["sub_centers"] == 2


def test_optimizer_and_warmup_choices(tmp_path, small_cache, cli):
    from featcache.train.loop import make_optimizer

    o = TrainOptions(lr=0.1, warmup_epochs=1, warmup="exponential", epochs=2)
    # exponential warm-up from lr / 100 to lr over the first epoch (10 steps), by hand
    assert lr_at(0, 20, 10, o) == pytest.approx(0.1 * 0.01 ** 0.9)
    assert lr_at(4, 20, 10, o) == pytest.approx(0.1 * 0.01 ** 0.5)
    assert lr_at(9, 20, 10, o) == pytest.approx(0.1)
    assert lr_at(0, 20, 10, TrainOptions(lr=0.1, epochs=2)) == pytest.approx(0.01)  # linear: lr / steps
    p = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(p, TrainOptions(optimizer="sgd", momentum=0.5, weight_decay=0.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert type(make_optimizer(p, TrainOptions(optimizer="adamw"))) is torch.optim.AdamW
    assert type(make_optimizer(p, TrainOptions())) is torch.optim.Adam
    heads = {}
    for name in ("adam", "adamw", "sgd"):
        out = tmp_path / name
        cli("train-head", "--cache", small_cache, "--epochs", "2", "--batch-size", "16", "--optimizer", name,
            "--weight-decay", "0.01", "--out", out, "--quiet")
        assert json.loads((out / "config.json").read_text())["options"]["optimizer"] == name
        heads[name] = head_weights(out)["net.1.weight"]
    assert not np.array_equal(heads["adam"], heads["adamw"]) and not np.array_equal(heads["adam"], heads["sgd"])
    r = cli("train-head", "--cache", small_cache, "--optimizer", "rmsprop", "--out", tmp_path / "x", code=2)
    assert "--optimizer rmsprop: expected one of adam, adamw, sgd" in r.output
