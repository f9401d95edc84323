"""Tests for featcache.train.losses.

Reference values are computed independently, per sample, in float64 Python with math.acos / math.cos,
and compared to the modules (which work in float32 through the angle-sum identity).
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from featcache.train.losses import LOSSES, MarginSoftmaxLoss, build_loss, loss_names

NAMES = [
    "softmax",
    "normface",
    "cosface",
    "arcface",
    "subcenter-arcface",
    "dynamic-arcface",
    "airface",
    "curricularface",
    "adaface",
    "adacos",
]

# Hand-made problem: B = 4, C = 5, E = 3.
W5 = [
    [1.0, 0.2, -0.3],
    [-0.4, 1.1, 0.5],
    [0.3, -0.8, 0.9],
    [-1.2, -0.1, 0.4],
    [0.5, 0.6, -1.0],
]
EMB = [
    [0.9, 0.1, -0.5],
    [0.2, -1.5, 1.0],
    [-0.6, 0.3, 0.8],
    [2.0, 1.5, 0.3],
]
LABELS = [0, 2, 4, 1]
COUNTS5 = [10, 200, 3, 50, 100]  # class id -> training count (deliberately not sorted)


# ----------------------------------------------------------------------------- independent references


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


def cos_rows(emb, weight, k=1):
    """(B, C) python cosines, max over each class's k consecutive rows."""
    n_classes = len(weight) // k

    def cosine(e, w):
        return dot(e, w) / (norm(e) * norm(w))

    return [
        [max(cosine(e, weight[c * k + j]) for j in range(k)) for c in range(n_classes)]
        for e in emb
    ]


def arc(c, m):
    theta = math.acos(c)
    return math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)


def dyn_margin(counts, m_min=0.2, m_max=0.5):
    lo, hi = min(counts), max(counts)
    return [m_min + 0.5 * (m_max - m_min) * (1 + math.cos(math.pi * (n - lo) / (hi - lo))) for n in counts]


def cross_entropy(rows, labels):
    total = 0.0
    for row, y in zip(rows, labels):
        top = max(row)
        total += -row[y] + top + math.log(sum(math.exp(v - top) for v in row))
    return total / len(rows)


def ref_margin_rows(rows, labels, target_fn, other_fn=lambda c: c):
    return [
        [target_fn(c, i) if j == labels[i] else other_fn(c) for j, c in enumerate(row)] for i, row in enumerate(rows)
    ]


def ref_softmax(emb, weight, labels):
    return [[dot(e, w) for w in weight] for e in emb]


def ref_normface(emb, weight, labels, s=16.0):
    return [[s * c for c in row] for row in cos_rows(emb, weight)]


def ref_cosface(emb, weight, labels, s=30.0, m=0.35):
    return ref_margin_rows(cos_rows(emb, weight), labels, lambda c, i: s * (c - m), lambda c: s * c)


def ref_arcface(emb, weight, labels, s=30.0, m=0.5, k=1):
    return ref_margin_rows(cos_rows(emb, weight, k), labels, lambda c, i: s * arc(c, m), lambda c: s * c)


def ref_dynamic(emb, weight, labels, counts, s=30.0):
    margins = dyn_margin(counts)
    return ref_margin_rows(cos_rows(emb, weight), labels, lambda c, i: s * arc(c, margins[labels[i]]), lambda c: s * c)


def ref_airface(emb, weight, labels, s=30.0, m=0.45):
    def logit(c, extra):
        theta = math.acos(max(-1 + 1e-7, min(1 - 1e-7, c)))
        return s * (math.pi - 2 * (theta + extra)) / math.pi

    return ref_margin_rows(cos_rows(emb, weight), labels, lambda c, i: logit(c, m), lambda c: logit(c, 0.0))


def ref_curricular(emb, weight, labels, t, s=30.0, m=0.5):
    rows = cos_rows(emb, weight)
    out = []
    for row, y in zip(rows, labels):
        threshold = math.cos(math.acos(row[y]) + m)
        out.append(
            [
                s * arc(c, m) if j == y else s * (c * (t + c) if c > threshold else c)
                for j, c in enumerate(row)
            ]
        )
    return out


def ref_adaface(emb, weight, labels, mu, sigma, s=64.0, m=0.4, h=0.333):
    eps = 1e-3
    rows = cos_rows(emb, weight)
    out = []
    for e, row, y in zip(emb, rows, labels):
        n = min(max(norm(e), eps), 100.0)
        z = max(-1.0, min(1.0, h * (n - mu) / (sigma + eps)))
        clamped = [max(-1 + eps, min(1 - eps, c)) for c in row]
        theta = min(max(math.acos(clamped[y]) - m * z, eps), math.pi - eps)
        out.append([s * (math.cos(theta) - (m + m * z)) if j == y else s * c for j, c in enumerate(clamped)])
    return out


def adaface_stats(emb, mu, sigma, alpha=0.01):
    norms = [norm(e) for e in emb]
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((n - mean) ** 2 for n in norms) / (len(norms) - 1))
    return alpha * mean + (1 - alpha) * mu, alpha * std + (1 - alpha) * sigma


def adacos_next_scale(rows, labels, s):
    b_avg = sum(sum(math.exp(s * c) for j, c in enumerate(row) if j != y) for row, y in zip(rows, labels)) / len(rows)
    angles = sorted(math.acos(row[y]) for row, y in zip(rows, labels))
    theta_med = angles[(len(angles) - 1) // 2]  # lower median, as torch.median
    return math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))


# ----------------------------------------------------------------------------- helpers


def make(name, weight, **hparams):
    """Build `name` with the given weight rows (python list or tensor) copied in."""
    weight = torch.as_tensor(weight, dtype=torch.float32)
    k = hparams.get("sub_centers", 3 if name == "subcenter-arcface" else 1)
    if name == "dynamic-arcface" and "class_counts" not in hparams:
        hparams["class_counts"] = list(range(1, weight.shape[0] // k + 1))
    loss = build_loss(name, weight.shape[0] // k, weight.shape[1], **hparams)
    with torch.no_grad():
        loss.weight.copy_(weight)
    return loss


def assert_close(actual, expected, rtol=1.3e-6, atol=1e-5):
    """Like torch.testing.assert_close (which costs seconds to import on first use)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    ok = torch.isclose(actual, expected, rtol=rtol, atol=atol)
    assert bool(ok.all()), f"max abs diff {(actual - expected).abs().max().item():.3g}\n{actual}\n{expected}"


def emb_t(emb=EMB):
    return torch.tensor(emb, dtype=torch.float32)


def labels_t(labels=LABELS):
    return torch.tensor(labels, dtype=torch.long)


def assert_rows(actual, expected, tol=1e-4):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    assert_close(actual.double(), expected, rtol=tol, atol=tol)


def sub_center_weight(k, n_classes=5, dim=3, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_classes * k, dim, generator=gen)


# ----------------------------------------------------------------------------- every loss vs its formula


def test_registry_names_and_defaults():
    assert loss_names() == NAMES
    assert list(LOSSES) == NAMES
    common = {"sample_fraction": 1.0, "precision": "fp32"}
    expected = {
        "softmax": {},
        "normface": {"scale": 16.0},
        "cosface": {"scale": 30.0, "margin": 0.35},
        "arcface": {"scale": 30.0, "margin": 0.5},
        "subcenter-arcface": {"scale": 30.0, "margin": 0.5, "sub_centers": 3},
        "dynamic-arcface": {"class_counts": None, "scale": 30.0, "margin_min": 0.2, "margin_max": 0.5},
        "airface": {"scale": 30.0, "margin": 0.45},
        "curricularface": {"scale": 30.0, "margin": 0.5, "momentum": 0.01},
        "adaface": {"scale": 64.0, "margin": 0.4, "h": 0.333, "momentum": 0.01},
        "adacos": {},
    }
    for name, spec in LOSSES.items():
        assert spec.name == name
        assert spec.defaults == {**expected[name], **common}
        assert spec.summary and "\n" not in spec.summary
        hp = {"class_counts": COUNTS5} if name == "dynamic-arcface" else {}
        assert isinstance(build_loss(name, 5, 3, **hp), spec.cls)


@pytest.mark.parametrize("name", NAMES)
def test_weight_shape(name):
    hp = {"class_counts": [1] * 7} if name == "dynamic-arcface" else {}
    loss = build_loss(name, 7, 4, **hp)
    k = 3 if name == "subcenter-arcface" else 1
    assert isinstance(loss.weight, torch.nn.Parameter)
    assert loss.weight.shape == (7 * k, 4)
    assert torch.isfinite(loss.weight).all() and loss.weight.std() > 0


def _reference_case(name):
    """(module, expected logit rows) for the hand-made problem, eval mode, non-default state set."""
    if name == "softmax":
        return make(name, W5), ref_softmax(EMB, W5, LABELS)
    if name == "normface":
        return make(name, W5), ref_normface(EMB, W5, LABELS)
    if name == "cosface":
        return make(name, W5), ref_cosface(EMB, W5, LABELS)
    if name == "arcface":
        return make(name, W5), ref_arcface(EMB, W5, LABELS)
    if name == "subcenter-arcface":
        weight = sub_center_weight(3)
        return make(name, weight), ref_arcface(EMB, weight.tolist(), LABELS, k=3)
    if name == "dynamic-arcface":
        return make(name, W5, class_counts=COUNTS5), ref_dynamic(EMB, W5, LABELS, COUNTS5)
    if name == "airface":
        return make(name, W5), ref_airface(EMB, W5, LABELS)
    if name == "curricularface":
        loss = make(name, W5)
        loss.t.fill_(0.3)
        return loss, ref_curricular(EMB, W5, LABELS, t=0.3)
    if name == "adaface":
        loss = make(name, W5)
        loss.batch_mean.fill_(1.5)
        loss.batch_std.fill_(0.5)
        return loss, ref_adaface(EMB, W5, LABELS, mu=1.5, sigma=0.5)
    if name == "adacos":
        s0 = math.sqrt(2) * math.log(4)
        return make(name, W5), [[s0 * c for c in row] for row in cos_rows(EMB, W5)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_loss_match_formula(name):
    loss, expected = _reference_case(name)
    loss.eval()
    logits = loss.logits(emb_t(), labels_t())
    assert_rows(logits, expected)
    value, hits = loss.forward_with_hits(emb_t(), labels_t())
    assert value.ndim == 0
    assert value.item() == pytest.approx(cross_entropy(expected, LABELS), rel=1e-4, abs=1e-4)
    assert loss(emb_t(), labels_t()).item() == pytest.approx(value.item(), rel=1e-6)
    cos = loss.cosine(emb_t())
    assert not cos.requires_grad and cos.shape == (4, 5)
    assert hits.tolist() == [max(range(5), key=row.__getitem__) == y for row, y in zip(cos.tolist(), LABELS)]
    k = 3 if name == "subcenter-arcface" else 1
    weight = sub_center_weight(3).tolist() if k == 3 else W5
    if name == "softmax":  # its "cosine" is the raw class score the classifier ranks by
        assert_rows(cos, ref_softmax(EMB, W5, LABELS))
    else:
        assert_rows(cos, cos_rows(EMB, weight, k))


def test_curricularface_has_hard_negatives_in_fixture():
    # The formula test above only exercises the re-weighting if some negative is harder than cos(θ_y + m).
    rows = cos_rows(EMB, W5)
    hard = [
        (i, j)
        for i, (row, y) in enumerate(zip(rows, LABELS))
        for j, c in enumerate(row)
        if j != y and c > math.cos(math.acos(row[y]) + 0.5)
    ]
    assert 0 < len(hard) < 4 * 4


def test_adaface_clips_z_and_norm_dependence():
    # h = 1 pushes the largest-norm sample's ẑ past 1, so the clip is exercised.
    loss = make("adaface", W5, h=1.0).eval()
    loss.batch_mean.fill_(1.5)
    loss.batch_std.fill_(0.5)
    expected = ref_adaface(EMB, W5, LABELS, mu=1.5, sigma=0.5, h=1.0)
    assert_rows(loss.logits(emb_t(), labels_t()), expected)
    assert (norm(EMB[3]) - 1.5) / 0.501 > 1
    # Same directions, different norms -> different target logits (the margin reads the RAW norm).
    scaled = emb_t() * torch.tensor([[1.0], [1.0], [1.0], [0.5]])
    a = loss.logits(emb_t(), labels_t())[3, LABELS[3]]
    b = loss.logits(scaled, labels_t())[3, LABELS[3]]
    assert not torch.isclose(a, b)


def test_adaface_clamps_every_cosine():
    # A non-target cosine of exactly 1 (axis-aligned) is clamped to 1 - 1e-3 like the target's.
    weight = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    emb = [[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]
    labels = [0, 2]
    loss = make("adaface", weight).eval()
    logits = loss.logits(emb_t(emb), labels_t(labels))
    assert_rows(logits, ref_adaface(emb, weight, labels, mu=20.0, sigma=100.0))
    assert logits[0, 1].item() == pytest.approx(64 * (1 - 1e-3), abs=1e-4)


# ----------------------------------------------------------------------------- identities and sub-centers


def test_subcenter_k1_equals_arcface():
    sub = make("subcenter-arcface", W5, sub_centers=1).eval()
    arcface = make("arcface", W5).eval()
    assert_close(sub.logits(emb_t(), labels_t()), arcface.logits(emb_t(), labels_t()))
    assert_close(sub(emb_t(), labels_t()), arcface(emb_t(), labels_t()))


def test_arcface_zero_margin_equals_normface():
    arcface = make("arcface", W5, margin=0.0, scale=30.0).eval()
    normface = make("normface", W5, scale=30.0).eval()
    assert_close(arcface.logits(emb_t(), labels_t()), normface.logits(emb_t(), labels_t()))
    assert_close(arcface(emb_t(), labels_t()), normface(emb_t(), labels_t()))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_subcenter_any_k(k):
    weight = sub_center_weight(k, seed=k)
    loss = make("subcenter-arcface", weight, sub_centers=k).eval()
    assert loss.weight.shape == (5 * k, 3)
    # Hand max over rows c*k .. c*k + k - 1.
    wn = F.normalize(weight, dim=1)
    en = F.normalize(emb_t(), dim=1)
    hand = torch.stack([torch.stack([(en[i] @ wn[c * k : (c + 1) * k].T).max() for c in range(5)]) for i in range(4)])
    assert_close(loss.cosine(emb_t()), hand)
    expected = ref_arcface(EMB, weight.tolist(), LABELS, k=k)
    assert_rows(loss.logits(emb_t(), labels_t()), expected)
    assert loss(emb_t(), labels_t()).item() == pytest.approx(cross_entropy(expected, LABELS), rel=1e-4)


def test_subcenter_picks_the_nearest_sub_center():
    # Class 1's second sub-center coincides with the embedding: its cosine must be 1, not the first row's.
    weight = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    loss = make("subcenter-arcface", weight, sub_centers=2).eval()
    cos = loss.cosine(torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(cos, torch.tensor([[math.sqrt(0.5), 1.0]]))


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_at_cos_plus_minus_one(name, sign):
    k = 3 if name == "subcenter-arcface" else 1
    weight = sub_center_weight(k, dim=3, seed=3)
    # Axis-aligned target rows make the normalised dot product exactly ±1 in float32.
    # (every sub-center of the class, so the max over sub-centers is the ±1 one for both signs).
    weight[0 * k : 1 * k] = torch.tensor([2.0, 0.0, 0.0])
    weight[2 * k : 3 * k] = torch.tensor([0.0, 0.0, 0.5])
    hp = {"class_counts": COUNTS5} if name == "dynamic-arcface" else {}
    loss = make(name, weight, **hp).train()
    emb = (sign * torch.stack([weight[0 * k], weight[2 * k]])).requires_grad_(True)
    labels = torch.tensor([0, 2])
    if name != "softmax":
        cos = loss.cosine(emb.detach())
        assert cos[0, 0].item() == sign and cos[1, 2].item() == sign
    value = loss(emb, labels)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(loss.weight.grad).all()
    assert loss.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["arcface", "subcenter-arcface", "dynamic-arcface", "curricularface"])
def test_arcface_fallback_when_angle_plus_margin_passes_pi(name):
    c_far, c_near = -0.95, -0.8  # θ + 0.5 > π for the first, < π for the second
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    k = 3 if name == "subcenter-arcface" else 1
    weight = weight.repeat_interleave(k, dim=0)  # identical sub-centers: the max is the same cosine
    hp = {"class_counts": [5, 5]} if name == "dynamic-arcface" else {}  # equal counts -> m_max = 0.5
    loss = make(name, weight, **hp).eval()
    emb = torch.tensor([[c_far, math.sqrt(1 - c_far**2), 0.0], [c_near, math.sqrt(1 - c_near**2), 0.0]])
    logits = loss.logits(emb, torch.tensor([0, 0]))
    m = 0.5
    assert math.acos(c_far) + m > math.pi > math.acos(c_near) + m
    fallback = 30 * (c_far - m * math.sin(m))
    assert logits[0, 0].item() == pytest.approx(fallback, abs=1e-3)
    assert abs(fallback - 30 * math.cos(math.acos(c_far) + m)) > 1  # the two branches differ here
    assert logits[1, 0].item() == pytest.approx(30 * math.cos(math.acos(c_near) + m), abs=1e-3)


# ----------------------------------------------------------------------------- dynamic margins


def test_dynamic_margins_by_class_id():
    counts = [3, 4, 10, 50, 100, 200]
    margins = [0.5, 0.5, 0.4991, 0.4598, 0.3536, 0.2]
    order = [4, 0, 5, 2, 3, 1]  # class id i has counts[order[i]]
    shuffled = [counts[o] for o in order]
    loss = build_loss("dynamic-arcface", 6, 3, class_counts=torch.tensor(shuffled))
    assert [round(v, 4) for v in loss.margins.tolist()] == [margins[o] for o in order]
    assert "margins" in loss.state_dict()
    # The target logit of a sample of class c uses m_c.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        loss.weight.copy_(torch.randn(6, 3, generator=gen))
    emb = torch.randn(6, 3, generator=gen)
    labels = torch.tensor([2, 5, 0, 1, 4, 3])
    cos = cos_rows(emb.tolist(), loss.weight.tolist())
    logits = loss.eval().logits(emb, labels)
    exact = dyn_margin(shuffled)
    for i, y in enumerate(labels.tolist()):
        assert logits[i, y].item() == pytest.approx(30 * arc(cos[i][y], exact[y]), abs=1e-4)
    # numpy and list inputs agree
    import numpy as np

    for counts_in in (shuffled, np.array(shuffled)):
        assert_close(build_loss("dynamic-arcface", 6, 3, class_counts=counts_in).margins, loss.margins)


# ----------------------------------------------------------------------------- running statistics


def test_adacos_initial_scale():
    loss = build_loss("adacos", 34_800, 2)
    assert round(loss.scale.item(), 2) == 14.79
    assert loss.scale.item() == pytest.approx(math.sqrt(2) * math.log(34_799), rel=1e-6)
    assert build_loss("adacos", 5, 3).scale.item() == pytest.approx(math.sqrt(2) * math.log(4), rel=1e-6)


def test_curricularface_t_moves_only_in_training():
    loss = make("curricularface", W5)
    assert loss.t.item() == 0.0 and "t" in loss.state_dict()
    loss.eval()
    loss(emb_t(), labels_t())
    assert loss.t.item() == 0.0
    loss.train()
    loss.logits(emb_t(), labels_t())  # only forward updates state
    assert loss.t.item() == 0.0
    rows = cos_rows(EMB, W5)
    mean_target = sum(row[y] for row, y in zip(rows, LABELS)) / 4
    t = 0.0
    for _ in range(2):
        value = loss(emb_t(), labels_t())
        t = 0.01 * mean_target + 0.99 * t  # updated before the logits are formed
        assert loss.t.item() == pytest.approx(t, rel=1e-5)
        assert value.item() == pytest.approx(cross_entropy(ref_curricular(EMB, W5, LABELS, t=t), LABELS), rel=1e-4)
    restored = make("curricularface", W5)
    restored.load_state_dict(loss.state_dict())
    assert restored.t.item() == loss.t.item()


def test_adaface_stats_move_only_in_training():
    loss = make("adaface", W5)
    assert {"batch_mean", "batch_std"} <= set(loss.state_dict())
    assert (loss.batch_mean.item(), loss.batch_std.item()) == (20.0, 100.0)
    loss.eval()
    loss(emb_t(), labels_t())
    assert (loss.batch_mean.item(), loss.batch_std.item()) == (20.0, 100.0)
    loss.train()
    value = loss(emb_t(), labels_t())
    mu, sigma = adaface_stats(EMB, 20.0, 100.0)
    assert loss.batch_mean.item() == pytest.approx(mu, rel=1e-6)
    assert loss.batch_std.item() == pytest.approx(sigma, rel=1e-6)
    assert value.item() == pytest.approx(cross_entropy(ref_adaface(EMB, W5, LABELS, mu, sigma), LABELS), rel=1e-4)


@pytest.mark.parametrize("block_rows", [None, 1])
@pytest.mark.parametrize(("labels", "median_past_quarter_pi"), [(LABELS, False), ([3, 0, 4, 1], True)])
def test_adacos_scale_moves_only_in_training(labels, median_past_quarter_pi, block_rows, monkeypatch):
    import featcache.train.losses.fused as losses

    if block_rows:  # the batch's sum of exps gathered over several blocks
        monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", block_rows)
        monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 1)
    loss = make("adacos", W5)
    s0 = math.sqrt(2) * math.log(4)
    rows = cos_rows(EMB, W5)
    angles = sorted(math.acos(row[y]) for row, y in zip(rows, labels))
    assert (angles[1] > math.pi / 4) == median_past_quarter_pi  # both branches of min(π/4, θ_med)
    loss.eval()
    loss(emb_t(), labels_t(labels))
    assert loss.scale.item() == pytest.approx(s0, rel=1e-6)
    loss.train()
    value = loss(emb_t(), labels_t(labels))
    s1 = adacos_next_scale(rows, labels, s0)
    assert abs(s1 - s0) > 0.01
    assert loss.scale.item() == pytest.approx(s1, rel=1e-5)
    assert value.item() == pytest.approx(cross_entropy([[s1 * c for c in row] for row in rows], labels), rel=1e-4)
    assert "scale" in loss.state_dict()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "hparams", "option"),
    [
        ("subcenter-arcface", {"sub_centers": 0}, "sub_centers"),
        ("subcenter-arcface", {"sub_centers": 2.5}, "sub_centers"),
        ("arcface", {"scale": 0}, "scale"),
        ("cosface", {"scale": -1.0}, "scale"),
        ("arcface", {"margin": -0.1}, "margin"),
        ("arcface", {"margin": math.pi}, "margin"),
        ("airface", {"margin": 4.0}, "margin"),
        ("arcface", {"num_classes": 1}, "num_classes"),
        ("softmax", {"num_classes": 1}, "num_classes"),
        ("arcface", {"sample_fraction": 0.0}, "sample_fraction"),
        ("arcface", {"sample_fraction": 1.5}, "sample_fraction"),
        ("arcface", {"precision": "fp16"}, "precision"),
        ("curricularface", {"momentum": 2.0}, "momentum"),
        ("dynamic-arcface", {"class_counts": [1, 2, 3]}, "class_counts"),
        ("dynamic-arcface", {"class_counts": [[1, 2, 3, 4, 5]]}, "class_counts"),
        ("dynamic-arcface", {}, "class_counts"),
        ("dynamic-arcface", {"class_counts": COUNTS5, "margin_min": 0.6}, "margin_min"),
        ("dynamic-arcface", {"class_counts": COUNTS5, "margin_max": -1}, "margin_max"),
    ],
)
def test_bad_hparams_raise(name, hparams, option):
    hparams = dict(hparams)
    num_classes = hparams.pop("num_classes", 5)
    with pytest.raises(ValueError, match=option) as info:
        build_loss(name, num_classes, 3, **hparams)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "option"), [("arcface", "sub_centers"), ("softmax", "scale"), ("adacos", "margin")])
def test_unknown_option_lists_valid_options(name, option):
    with pytest.raises(ValueError) as info:
        build_loss(name, 5, 3, **{option: 1})
    message = str(info.value)
    assert option in message and "\n" not in message
    for valid in LOSSES[name].defaults:
        assert valid in message


def test_unknown_loss_lists_names():
    with pytest.raises(ValueError) as info:
        build_loss("sphereface", 5, 3)
    message = str(info.value)
    assert "sphereface" in message and "\n" not in message
    for name in NAMES:
        assert name in message


# ----------------------------------------------------------------------------- Partial FC


def _pfc_problem(name, fraction, n_classes=50, batch=8):
    gen = torch.Generator().manual_seed(11)
    k = 3 if name == "subcenter-arcface" else 1
    hp = {"class_counts": list(range(3, 3 + n_classes))} if name == "dynamic-arcface" else {}
    loss = make(name, torch.randn(n_classes * k, 8, generator=gen), sample_fraction=fraction, **hp)
    emb = torch.randn(batch, 8, generator=gen)
    labels = torch.tensor([3, 17, 17, 42, 0, 49, 3, 25])
    return loss, emb, labels


@pytest.mark.parametrize("name", ["arcface", "subcenter-arcface", "dynamic-arcface", "softmax"])
def test_partial_fc_full_fraction_equals_all_classes(name):
    loss, emb, labels = _pfc_problem(name, 1.0)
    full = copy.deepcopy(loss).eval()
    logits, target, classes = loss.train().logits_with_classes(emb, labels)
    assert logits.shape == (8, 50)
    assert_close(logits, full.logits(emb, labels))
    assert_close(target, labels)
    assert_close(classes, torch.arange(50))
    assert_close(loss(emb, labels), full(emb, labels))


@pytest.mark.parametrize("name", ["arcface", "subcenter-arcface", "dynamic-arcface", "softmax"])
def test_partial_fc_subset(name):
    loss, emb, labels = _pfc_problem(name, 0.2)
    full_logits = copy.deepcopy(loss).eval().logits(emb, labels)
    loss.train()
    torch.manual_seed(0)
    logits, target, classes = loss.logits_with_classes(emb, labels)
    n_present = len(set(labels.tolist()))
    assert logits.shape == (8, n_present + math.ceil(0.2 * (50 - n_present)))
    assert logits.shape[1] < 50
    assert set(labels.tolist()) <= set(classes.tolist())
    assert classes.tolist() == sorted(set(classes.tolist()))
    assert_close(classes[target], labels)
    # The subset's logits are exactly the full logits' columns (margins still by class id).
    assert_close(logits, full_logits[:, classes])
    # Seeded sampling is reproducible and the loss is the cross-entropy over the subset.
    torch.manual_seed(0)
    assert_close(loss(emb, labels), F.cross_entropy(full_logits[:, classes], target))
    torch.manual_seed(1)
    assert not torch.equal(loss.logits_with_classes(emb, labels)[2], classes)


def test_partial_fc_ignored_in_eval():
    loss, emb, labels = _pfc_problem("arcface", 0.1)
    loss.eval()
    logits, target, classes = loss.logits_with_classes(emb, labels)
    assert logits.shape == (8, 50)
    assert_close(target, labels)
    assert_close(classes, torch.arange(50))


def test_partial_fc_gradient_touches_only_sampled_classes():
    loss, emb, labels = _pfc_problem("arcface", 0.2)
    loss.train()
    torch.manual_seed(0)
    classes = loss.logits_with_classes(emb, labels)[2]
    torch.manual_seed(0)
    loss(emb, labels).backward()
    touched = loss.weight.grad.abs().sum(dim=1) > 0
    assert set(torch.nonzero(touched).flatten().tolist()) == set(classes.tolist())


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("name", ["arcface", "subcenter-arcface", "softmax", "adaface"])
def test_bf16_close_to_fp32(name):
    gen = torch.Generator().manual_seed(5)
    k = 3 if name == "subcenter-arcface" else 1
    weight = torch.randn(100 * k, 64, generator=gen)
    emb = torch.randn(32, 64, generator=gen)
    labels = torch.randint(0, 100, (32,), generator=gen)
    fp32 = make(name, weight).eval()
    bf16 = make(name, weight, precision="bf16").eval()
    cos32, cos16 = fp32.cosine(emb), bf16.cosine(emb)
    assert cos16.dtype == torch.float32 and bf16.logits(emb, labels).dtype == torch.float32
    assert not torch.equal(cos32, cos16)  # the matmul really ran in bfloat16
    assert_close(cos16, cos32, atol=0.2 if name == "softmax" else 0.01, rtol=0.02)
    assert bf16(emb, labels).item() == pytest.approx(fp32(emb, labels).item(), rel=0.02)


# ----------------------------------------------------------------------------- misc API


def test_hits_are_detached_and_forward_returns_scalar():
    loss = make("subcenter-arcface", sub_center_weight(3)).train()
    emb = emb_t().requires_grad_(True)
    value, hits = loss.forward_with_hits(emb, labels_t())
    assert value.requires_grad and value.ndim == 0
    assert not hits.requires_grad
    assert hits.shape == (4,) and hits.dtype == torch.bool


def test_wrong_embedding_shape_raises():
    loss = make("arcface", W5)
    with pytest.raises(ValueError, match="embeddings"):
        loss(torch.zeros(4, 7), labels_t())


def test_random_init_is_seeded_by_caller():
    torch.manual_seed(123)
    a = build_loss("arcface", 10, 4).weight.detach().clone()
    torch.manual_seed(123)
    b = build_loss("arcface", 10, 4).weight.detach().clone()
    random.seed(0)  # python's RNG plays no part
    torch.manual_seed(124)
    c = build_loss("arcface", 10, 4).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["subcenter-arcface", "curricularface"])  # linear and elementwise others
def test_hits_are_top1_among_all_or_the_sampled_classes(name):
    torch.manual_seed(0)
    k = 3 if name == "subcenter-arcface" else 1
    loss = build_loss(name, 40, 8, sample_fraction=0.25, **({"sub_centers": k} if k > 1 else {}))
    emb = torch.randn(64, 8) * 3
    labels = torch.randint(0, 40, (64,))
    with torch.no_grad():  # make half the samples right: their embedding is their class's first sub-center
        emb[:32] = loss.weight[labels[:32] * k] * 5
    loss.eval()  # all classes
    _, hits = loss.forward_with_hits(emb, labels)
    top1 = loss.cosine(emb).argmax(dim=1) == labels
    assert 32 <= top1.sum() < 64
    assert hits.tolist() == top1.tolist()
    loss.train()  # Partial FC: top-1 among the sampled classes
    torch.manual_seed(1)
    _, hits = loss.forward_with_hits(emb, labels)
    torch.manual_seed(1)
    _, _, classes = loss.logits_with_classes(emb, labels)
    assert set(labels.tolist()) <= set(classes.tolist()) and len(classes) < 40
    assert hits.tolist() == (classes[loss.cosine(emb)[:, classes].argmax(dim=1)] == labels).tolist()


# ----------------------------------------------------------------------------- the fused pass


def _reference_step(loss, emb, labels):
    """Loss and gradients the plain way: the full logit matrix, F.cross_entropy, autograd."""
    emb = emb.clone().requires_grad_(True)
    loss.zero_grad()
    logits, target, _ = loss.logits_with_classes(emb, labels)
    value = F.cross_entropy(logits, target)
    value.backward()
    return value.detach(), emb.grad, loss.weight.grad.clone()


def _fused_step(loss, emb, labels):
    emb = emb.clone().requires_grad_(True)
    loss.zero_grad()
    value, hits = loss.forward_with_hits(emb, labels)
    (value * 3.0).backward()  # the stored gradients are scaled by the incoming one
    return value.detach(), emb.grad / 3.0, loss.weight.grad.clone() / 3.0, hits


@pytest.mark.parametrize("fraction", [1.0, 0.3])
@pytest.mark.parametrize("name", NAMES)
def test_fused_pass_equals_full_matrix_autograd(name, fraction, monkeypatch):
    """Loss, both gradients and top-1 hits of the block-wise fused pass against the plain computation,
    with blocks of 5 rows (8 blocks for 37 rows), sub-centers and Partial FC."""
    import featcache.train.losses.fused as losses

    monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 5 * 60 * 3)
    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 1)
    gen = torch.Generator().manual_seed(21)
    k = 3 if name == "subcenter-arcface" else 1
    n_classes, batch = 60, 37
    assert losses._block_rows(batch, n_classes * k, torch.device("cpu")) == 5 * 3 // k
    hp = {"class_counts": torch.randint(3, 90, (n_classes,), generator=gen)} if name == "dynamic-arcface" else {}
    loss = make(name, torch.randn(n_classes * k, 16, generator=gen), sample_fraction=fraction, **hp).train()
    emb = torch.randn(batch, 16, generator=gen) * 3
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    # Half of them near a sub-center of their class (cos ~0.9, away from the ill-conditioned cos = 1): top-1 hits.
    emb[:18] = loss.weight.detach()[labels[:18] * k] * 2 + torch.randn(18, 16, generator=gen) * 0.5
    reference = copy.deepcopy(loss)
    torch.manual_seed(5)
    value, g_emb, g_weight, hits = _fused_step(loss, emb, labels)
    reference.load_state_dict(loss.state_dict())  # running statistics as the fused forward left them
    torch.manual_seed(5)
    ref_value, ref_emb, ref_weight = _reference_step(reference, emb, labels)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)
    torch.manual_seed(5)
    _, _, classes = reference.logits_with_classes(emb, labels)
    assert hits.tolist() == (classes[reference.cosine(emb)[:, classes].argmax(dim=1)] == labels).tolist()
    assert 0 < hits.sum() < batch


def test_fused_adaface_clamps_other_cosines_like_the_full_matrix(monkeypatch):
    """AdaFace clamps every non-target cosine to ±(1 − 1e-3): value capped, gradient 0 past it. The fused
    pass only clamps blocks that need it; here rows 1 and 7 (blocks 0 and 1 of 5 rows) lie within 1e-4
    of another class's weight and of its opposite."""
    import featcache.train.losses.fused as losses

    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 5)
    monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 1)
    gen = torch.Generator().manual_seed(17)
    weight = torch.randn(6, 8, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0])
    emb = torch.randn(13, 8, generator=gen) * 4
    emb[1] = weight[4] * 3 + torch.randn(8, generator=gen) * 1e-3  # cos ~ +0.99999 to class 4
    emb[7] = -weight[2] * 2 + torch.randn(8, generator=gen) * 1e-3  # cos ~ -0.99999 to class 2
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    assert cos[1, 4] > 1 - 1e-4 and cos[7, 2] < -1 + 1e-4
    loss = make("adaface", weight).eval()
    value, g_emb, g_weight, hits = _fused_step(loss, emb, labels)
    ref_value, ref_emb, ref_weight = _reference_step(copy.deepcopy(loss), emb, labels)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)
    assert hits.tolist() == (loss.cosine(emb).argmax(dim=1) == labels).tolist()
    # ... and the clamp matters: without it the loss and the gradients are not these.
    monkeypatch.setattr(type(loss), "others_clamp", None)
    unclamped_value, unclamped_emb, _ = _reference_step(copy.deepcopy(loss), emb, labels)
    assert unclamped_value.item() != pytest.approx(ref_value.item(), rel=1e-5)
    assert not torch.allclose(unclamped_emb[1], ref_emb[1], rtol=1e-3)


def test_fused_airface_derivative_is_zero_past_its_acos_clamp():
    """Rows that coincide with another class's weight or its opposite (|cos| past 1 − 1e-7): the
    clamp's gradient is 0 there, not 1/sqrt(1 − c²) = inf."""
    gen = torch.Generator().manual_seed(23)
    weight = torch.randn(5, 8, generator=gen)
    emb = torch.randn(6, 8, generator=gen)
    emb[0], emb[3] = weight[2] * 3, -weight[4]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    assert cos[0, 2].abs() > 1 - 1e-7 and cos[3, 4].abs() > 1 - 1e-7
    loss = make("airface", weight).train()
    value, g_emb, g_weight, hits = _fused_step(loss, emb, labels)
    ref_value, ref_emb, ref_weight = _reference_step(copy.deepcopy(loss), emb, labels)
    assert torch.isfinite(g_emb).all() and torch.isfinite(g_weight).all()
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["airface", "curricularface"])
def test_fused_autograd_path_for_losses_without_elementwise_others(name, monkeypatch):
    """A loss that only overrides _scaled_logits (no _others_) is differentiated by autograd a block at
    a time: the built-in ones all have _others_, so it is taken away here."""
    import featcache.train.losses.fused as losses

    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 4)
    monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 1)
    cls = LOSSES[name].cls
    monkeypatch.setattr(cls, "_others_", MarginSoftmaxLoss._others_)
    gen = torch.Generator().manual_seed(31)
    loss = make(name, torch.randn(20, 16, generator=gen)).train()
    assert not loss.target_only and not loss.elementwise_others
    emb, labels = torch.randn(11, 16, generator=gen) * 2, torch.randint(0, 20, (11,), generator=gen)
    reference = copy.deepcopy(loss)
    value, g_emb, g_weight, hits = _fused_step(loss, emb, labels)
    reference.load_state_dict(loss.state_dict())
    ref_value, ref_emb, ref_weight = _reference_step(reference, emb, labels)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)
    assert hits.tolist() == (reference.cosine(emb).argmax(dim=1) == labels).tolist()


def test_fused_sub_center_ties_go_to_the_first_like_torch_max():
    # Sub-centers 0 and 2 of every class coincide: the whole gradient must go to sub-center 0.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 3, 8, generator=gen)
    weight[:, 2] = weight[:, 0]
    loss = make("subcenter-arcface", weight.reshape(18, 8)).train()
    emb, labels = torch.randn(10, 8, generator=gen), torch.randint(0, 6, (10,), generator=gen)
    _, _, g_weight, _ = _fused_step(loss, emb, labels)
    _, _, ref_weight = _reference_step(copy.deepcopy(loss), emb, labels)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)
    g = g_weight.view(6, 3, 8)
    assert g[:, 2].abs().sum() == 0 and g[:, 0].abs().sum() > 0


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_fused_sub_center_routing_any_k_with_ties(k, monkeypatch):
    """Gradients against the full-matrix autograd computation for every k, in blocks of 5 rows, with
    tied sub-centers in every position: each tie goes to the first of the tied sub-centers."""
    import featcache.train.losses.fused as losses

    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 5)
    monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 1)
    gen = torch.Generator().manual_seed(40 + k)
    weight = torch.randn(8, k, 8, generator=gen)
    weight[0, 1:] = weight[0, 0]  # all k tied
    weight[1, k - 1] = weight[1, 0]  # first and last
    weight[2, 0] = weight[2, 1]  # first two
    weight[3, k - 1] = weight[3, k - 2]  # last two
    loss = make("subcenter-arcface", weight.reshape(8 * k, 8), sub_centers=k).train()
    emb, labels = torch.randn(23, 8, generator=gen), torch.randint(0, 8, (23,), generator=gen)
    _, g_emb, g_weight, _ = _fused_step(loss, emb, labels)
    _, ref_emb, ref_weight = _reference_step(copy.deepcopy(loss), emb, labels)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)
    g = g_weight.view(8, k, 8).abs().sum(dim=2)
    assert (g[0, 0] > 0).item() and g[0, 1:].sum() == 0
    assert g[1, k - 1] == 0 and g[2, 1] == 0
    assert (g[4:] > 0).all()  # untied classes: every sub-center wins somewhere, over 23 random rows


@pytest.mark.parametrize("name", ["subcenter-arcface", "curricularface"])
def test_fused_bf16_close_to_fp32_gradients(name, monkeypatch):
    import featcache.train.losses.fused as losses

    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 7)  # 6 blocks for 40 rows
    monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 1)
    gen = torch.Generator().manual_seed(8)
    k = 3 if name == "subcenter-arcface" else 1
    weight = torch.randn(50 * k, 32, generator=gen)
    emb, labels = torch.randn(40, 32, generator=gen), torch.randint(0, 50, (40,), generator=gen)
    v32, e32, w32, _ = _fused_step(make(name, weight).train(), emb, labels)
    v16, e16, w16, _ = _fused_step(make(name, weight, precision="bf16").train(), emb, labels)
    assert v16.item() == pytest.approx(v32.item(), rel=0.02)
    for a, b in ((e16, e32), (w16, w32)):
        assert not torch.equal(a, b)
        assert (a - b).norm() / b.norm() < 0.05


def test_fused_loss_and_gradient_are_exact_when_the_target_dominates():
    # Target cosine 0.9, the two others -0.9, s = 30, m = 0.5: the loss is ~1e-19. A cross-entropy formed
    # as log(sum of exps) rounds it (and the target's gradient, p_y - 1) to 0 in float32.
    c = 0.9
    weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    emb = torch.tensor([[c, math.sqrt(1 - c * c)]])
    loss = make("arcface", weight).train()
    value, g_emb, g_weight, _ = _fused_step(loss, emb, torch.tensor([0]))

    e64 = emb.double().requires_grad_(True)  # the formula, in float64
    cos = F.normalize(e64, dim=1) @ F.normalize(weight.double(), dim=1).T
    target = 30 * torch.cos(torch.acos(cos[0, 0]) + 0.5)
    expected = torch.log1p(torch.exp(30 * cos[0, 1:] - target).sum())
    expected.backward()
    assert 1e-22 < expected.item() < 1e-16
    assert value.item() == pytest.approx(expected.item(), rel=1e-4, abs=0)
    assert_close(g_emb.double(), e64.grad, rtol=1e-3, atol=0)
    assert g_weight.abs().sum() > 0


@pytest.mark.parametrize("scale", [30.0, 120.0])
def test_fused_softmax_is_exact_when_every_logit_is_near_minus_the_scale(scale):
    """A row whose every cosine is below -0.99 (all exps tiny before the row-max shift), against the
    float64 formula, at the paper's scale and a large one."""
    gen = torch.Generator().manual_seed(5)
    direction = F.normalize(torch.randn(8, generator=gen), dim=0)
    weight = direction + torch.randn(5, 8, generator=gen) * 0.01  # five classes, all nearly `direction`
    emb = torch.stack([-direction * 2, direction + torch.randn(8, generator=gen) * 0.3, torch.randn(8, generator=gen)])
    labels = torch.tensor([1, 3, 4])
    loss = make("arcface", weight, scale=scale, margin=0.5).eval()
    value, g_emb, g_weight, hits = _fused_step(loss, emb, labels)
    cos = F.normalize(emb.double(), dim=1) @ F.normalize(weight.double(), dim=1).T
    assert cos[0].max() < -0.99  # row 0: every logit below -0.99·s
    theta = torch.acos(cos[torch.arange(3), labels].clamp(-1, 1))
    fallback = cos[torch.arange(3), labels] - 0.5 * math.sin(0.5)
    t = torch.where(theta + 0.5 > math.pi, fallback, torch.cos(theta + 0.5)) * scale
    logits = (cos * scale).scatter(1, labels[:, None], t[:, None])
    expected = F.cross_entropy(logits, labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    ref_value, ref_emb, ref_weight = _reference_step(copy.deepcopy(loss), emb, labels)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)


def test_fused_normalisation_backward_matches_f_normalize_for_a_zero_row():
    # A class weight of norm 0 is clamped (as F.normalize, eps 1e-12): its gradient is g / eps, not NaN.
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 5, generator=gen)
    weight[2] = 0.0
    loss = make("cosface", weight).train()
    emb, labels = torch.randn(7, 5, generator=gen), torch.tensor([0, 1, 2, 3, 4, 5, 2])
    value, g_emb, g_weight, _ = _fused_step(loss, emb, labels)
    ref_value, ref_emb, ref_weight = _reference_step(copy.deepcopy(loss), emb, labels)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert_close(g_emb, ref_emb, rtol=1e-4, atol=1e-6)
    assert_close(g_weight, ref_weight, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(g_weight).all() and g_weight[2].abs().max() > 1e6


def test_fused_backward_runs_once_per_forward():
    loss = make("arcface", W5).train()
    value = loss(emb_t().requires_grad_(True), labels_t())
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        value.backward()
