"""Losses against independent float64 references written from the formulas (explicit loops)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emoq.models.losses import FocalLoss, MALoss, MALOutput, SupConLoss, focal_loss, supcon_loss

ATOL = 1e-6


# ----------------------------------------------------------------------------- references


def ref_focal(logits, target, gamma, alpha=None, reduction="mean", ignore_index=-100):
    """FL_i = -alpha[y] (1 - p)^gamma log p, one row at a time in python floats."""
    rows = logits.double().tolist()
    per_row = []
    for row, y in zip(rows, target.tolist()):
        if y == ignore_index:
            per_row.append(0.0)
            continue
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        p = math.exp(row[y] - m) / z
        a = 1.0 if alpha is None else (alpha if isinstance(alpha, float) else alpha[y])
        per_row.append(-a * (1.0 - p) ** gamma * math.log(p))
    n_valid = sum(1 for y in target.tolist() if y != ignore_index)
    if reduction == "none":
        return torch.tensor(per_row, dtype=torch.float64)
    if reduction == "sum":
        return torch.tensor(sum(per_row), dtype=torch.float64)
    return torch.tensor(sum(per_row) / n_valid if n_valid else 0.0, dtype=torch.float64)


def ref_supcon_terms(features, labels, temperature, anchor_rows=None):
    """Per-anchor L^sup_out terms (Khosla et al. eq. 2) for anchors with >= 1 positive.

    ``anchor_rows`` restricts which samples act as anchors (all of them by default), while every
    view of every sample is contrast.
    """
    f = features.double()
    if f.ndim == 2:
        f = f[:, None, :]
    n, v, _ = f.shape
    views = []  # (sample, label, unit vector)
    for s in range(n):
        for k in range(v):
            vec = f[s, k].tolist()
            norm = math.sqrt(sum(x * x for x in vec))
            views.append((s, int(labels[s]), [x / norm for x in vec]))
    anchor_rows = range(n) if anchor_rows is None else anchor_rows
    terms = []
    for i, (s_i, y_i, z_i) in enumerate(views):
        if s_i not in anchor_rows:
            continue
        sims = [sum(a * b for a, b in zip(z_i, z_a)) / temperature for z_a in [w[2] for w in views]]
        others = [a for a in range(len(views)) if a != i]
        pos = [p for p in others if views[p][1] == y_i]
        if not pos:
            continue
        denom = sum(math.exp(sims[a]) for a in others)
        terms.append(-sum(math.log(math.exp(sims[p]) / denom) for p in pos) / len(pos))
    return terms


def ref_supcon(features, labels, temperature):
    terms = ref_supcon_terms(features, labels, temperature)
    return sum(terms) / len(terms) if terms else 0.0


# ----------------------------------------------------------------------------- focal


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (12,), generator=g)
    return logits, target


@pytest.mark.parametrize(
    "gamma,alpha",
    [
        (0.0, None),
        (2.0, None),
        (0.5, None),
        (2.0, 0.25),
        (1.5, [0.1, 0.2, 0.3, 0.15, 0.25]),
        (3.0, [1, 2, 3, 4, 5]),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_matches_reference(batch, gamma, alpha, reduction):
    logits, target = batch
    got = focal_loss(logits, target, gamma=gamma, alpha=alpha, reduction=reduction)
    want = ref_focal(
        logits, target, gamma, alpha if not isinstance(alpha, list) else [float(a) for a in alpha], reduction
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_focal_gamma0_is_cross_entropy(batch):
    logits, target = batch
    target = target.clone()
    target[[1, 4]] = -100
    torch.testing.assert_close(
        focal_loss(logits, target, gamma=0.0), torch.nn.functional.cross_entropy(logits, target)
    )


def test_focal_per_class_alpha_is_not_weighted_ce_trick(batch):
    """p must come from the plain softmax: exp(-alpha*CE) would give a different modulating factor."""
    logits, target = batch
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none", weight=alpha)
    wrong = ((1 - torch.exp(-ce)) ** 2 * ce).mean()
    got = focal_loss(logits, target, gamma=2.0, alpha=alpha)
    assert not torch.allclose(got, wrong, atol=1e-4)
    torch.testing.assert_close(got, ref_focal(logits, target, 2.0, alpha.tolist()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_ignore_index(batch, reduction):
    logits, target = batch
    target = target.clone()
    target[[0, 3, 7]] = -100
    got = focal_loss(logits, target, gamma=2.0, alpha=[0.5, 1, 1, 2, 1], reduction=reduction)
    want = ref_focal(logits, target, 2.0, [0.5, 1.0, 1.0, 2.0, 1.0], reduction)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if reduction == "none":
        assert got[[0, 3, 7]].abs().sum() == 0


def test_focal_all_ignored_is_zero_with_grad(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_()
    loss = focal_loss(logits, torch.full_like(target, -100))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_focal_custom_ignore_index_and_nd_input():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    target = torch.tensor([[0, 1, 7], [3, 7, 2]])
    got = focal_loss(logits, target, ignore_index=7, reduction="none")
    assert got.shape == (2, 3)
    want = ref_focal(logits.reshape(6, 4), target.reshape(6), 2.0, None, "none", ignore_index=7)
    torch.testing.assert_close(got.reshape(6), want, atol=ATOL, rtol=0)


def test_focal_errors(batch):
    logits, target = batch
    with pytest.raises(ValueError, match="alpha has 3 entries"):
        focal_loss(logits, target, alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="batchmean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_half_precision_computes_in_fp32(batch, dtype):
    logits, target = batch
    half = logits.to(dtype).requires_grad_()
    got = focal_loss(half, target, alpha=[1, 2, 1, 2, 1])
    assert got.dtype == torch.float32
    want = ref_focal(half.detach().double(), target, 2.0, [1.0, 2.0, 1.0, 2.0, 1.0])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    got.backward()
    assert half.grad.dtype == dtype and torch.isfinite(half.grad.float()).all()


def test_focal_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 1, 1])
    alpha = torch.tensor([0.2, 0.3, 0.4, 0.1], dtype=torch.float64)
    for gamma in (0.0, 1.0, 2.0, 2.5):
        assert torch.autograd.gradcheck(
            lambda x, gm=gamma: focal_loss(x, target, gamma=gm, alpha=alpha), (logits,)
        )


def test_focal_confident_rows_have_finite_grad():
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0, 1]), gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_module_alpha_buffer(batch):
    logits, target = batch
    mod = FocalLoss(gamma=2.0, alpha=[0.1, 0.2, 0.3, 0.15, 0.25])
    assert "alpha" in dict(mod.named_buffers())
    mod = mod.double()
    torch.testing.assert_close(
        mod(logits, target), ref_focal(logits, target, 2.0, [0.1, 0.2, 0.3, 0.15, 0.25]), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        FocalLoss(alpha=0.25)(logits, target), ref_focal(logits, target, 2.0, 0.25), atol=ATOL, rtol=0
    )


# ----------------------------------------------------------------------------- supcon


def _feats(n, v=None, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if v is None else (n, v, d)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
def test_supcon_single_view_matches_reference(temperature):
    f = _feats(10)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 2, 4])  # classes 3 and 4 occur once -> excluded anchors
    got = supcon_loss(f, labels, temperature)
    torch.testing.assert_close(
        got, torch.tensor(ref_supcon(f, labels, temperature), dtype=torch.float64), atol=ATOL, rtol=0
    )
    assert len(ref_supcon_terms(f, labels, temperature)) == 8


@pytest.mark.parametrize("temperature", [0.07, 0.3])
def test_supcon_multi_view_matches_reference(temperature):
    f = _feats(7, v=3)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0])  # singletons still have their other views as positives
    got = supcon_loss(f, labels, temperature)
    terms = ref_supcon_terms(f, labels, temperature)
    assert len(terms) == 21
    torch.testing.assert_close(
        got, torch.tensor(sum(terms) / len(terms), dtype=torch.float64), atol=ATOL, rtol=0
    )


def test_supcon_ignores_minus_100_rows():
    f = _feats(8)
    labels = torch.tensor([0, 1, -100, 0, 1, -100, 2, 2])
    keep = labels != -100
    want = ref_supcon(f[keep], labels[keep], 0.1)
    torch.testing.assert_close(
        supcon_loss(f, labels, 0.1), torch.tensor(want, dtype=torch.float64), atol=ATOL, rtol=0
    )


def test_supcon_no_positive_is_zero_and_backpropagates():
    f = _feats(4).requires_grad_()
    loss = supcon_loss(f, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    empty = supcon_loss(f, torch.full((4,), -100))
    assert empty.item() == 0.0 and empty.requires_grad


def test_supcon_scale_invariant_and_stable():
    """Features are L2-normalised inside; a tiny temperature must not overflow."""
    f = _feats(6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(supcon_loss(f * 1000, labels, 0.1), supcon_loss(f, labels, 0.1))
    x = f.float().requires_grad_()
    loss = supcon_loss(x, labels, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_supcon_half_precision():
    f = _feats(6, v=2).to(torch.bfloat16).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    loss = supcon_loss(f, labels, 0.07)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss.double(),
        torch.tensor(ref_supcon(f.detach(), labels, 0.07), dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )
    loss.backward()
    assert torch.isfinite(f.grad.float()).all()


def test_supcon_gradcheck():
    labels = torch.tensor([0, 1, 0, 1, 2])
    x = _feats(5, d=4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, labels, 0.5), (x,))
    xv = _feats(3, v=2, d=3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, torch.tensor([0, 1, 0]), 0.2), (xv,))


def test_supcon_module_and_errors():
    f = _feats(6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(SupConLoss(0.2)(f, labels), supcon_loss(f, labels, 0.2))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(f, labels[:5])
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(f, labels, temperature=0.0)


# ----------------------------------------------------------------------------- supcon, 2 processes


def _dist_worker(rank, world, init_file, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for feats, labels, sizes, weights in cases:
            start = sum(sizes[:rank])
            local = feats[start : start + sizes[rank]].clone().requires_grad_()
            loss = supcon_loss(local, labels[start : start + sizes[rank]], 0.1)
            (loss * weights[rank]).backward()
            results.append((loss.detach(), local.grad))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_supcon_distributed_matches_single_process(tmp_path):
    """World size 2 over gloo: local anchors, global contrast, exact gradients.

    Case A has equal valid-anchor counts per rank, so the mean of the rank losses equals the
    single-process loss on the concatenated batch, and each rank's feature gradient of
    ``sum_r L_r`` equals ``2 * dL_single/df`` (the backward all-reduce carries the cross terms).
    Case B has unequal batch sizes (3 vs 5, one ignored row); each rank backpropagates
    ``n_r * L_r`` so that ``sum_r n_r L_r = N * L_single`` is compared, values and gradients.
    """
    feats_a = _feats(8, v=2, d=5, seed=10)
    labels_a = torch.tensor([0, 1, 2, 0, 1, 0, 2, 1])  # every sample has a positive -> 8 anchors each
    feats_b = _feats(8, d=5, seed=11)
    labels_b = torch.tensor([0, 3, 1, 1, 0, -100, 2, 0])  # 3 occurs once; rank0 rows 0..2, rank1 rows 3..7
    keep_b = labels_b != -100
    terms0 = ref_supcon_terms(feats_b[keep_b], labels_b[keep_b], 0.1, anchor_rows=range(0, 3))
    terms1 = ref_supcon_terms(feats_b[keep_b], labels_b[keep_b], 0.1, anchor_rows=range(3, 7))
    anchors_b = [len(terms0), len(terms1)]  # rank0: rows 0, 2 (row 1 is a singleton); rank1: rows 3, 4, 7
    assert anchors_b == [2, 3]
    cases = [
        (feats_a, labels_a, [4, 4], [1.0, 1.0]),
        (feats_b, labels_b, [3, 5], [float(a) for a in anchors_b]),
    ]

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), cases), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    # Case A: mean of the per-rank losses == single-process loss; gradients include cross-rank terms.
    single_in = feats_a.clone().requires_grad_()
    single = supcon_loss(single_in, labels_a, 0.1)
    single.backward()
    torch.testing.assert_close((r0[0][0] + r1[0][0]) / 2, single.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([r0[0][1], r1[0][1]]), 2 * single_in.grad, atol=ATOL, rtol=0)
    assert r0[0][1].abs().sum() > 0 and r1[0][1].abs().sum() > 0

    # Case B: per-anchor sums; the per-rank values also match the loop reference with local anchors.
    torch.testing.assert_close(r0[1][0].item(), sum(terms0) / len(terms0), atol=ATOL, rtol=0)
    torch.testing.assert_close(r1[1][0].item(), sum(terms1) / len(terms1), atol=ATOL, rtol=0)
    single_in = feats_b.clone().requires_grad_()
    single = supcon_loss(single_in, labels_b, 0.1)
    (single * sum(anchors_b)).backward()
    total = r0[1][0] * anchors_b[0] + r1[1][0] * anchors_b[1]
    torch.testing.assert_close(total, single.detach() * sum(anchors_b), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([r0[1][1], r1[1][1]]), single_in.grad, atol=ATOL, rtol=0)
    assert r1[1][1][2].abs().sum() == 0  # the ignored row gets no gradient


# ----------------------------------------------------------------------------- MALoss


def test_maloss_combines_terms():
    logits = _feats(6, d=4, seed=5).requires_grad_()
    feats = _feats(6, seed=6).requires_grad_()
    labels = torch.tensor([0, 1, -100, 1, 0, 3])
    lm = torch.tensor(1.25, dtype=torch.float64, requires_grad=True)
    crit = MALoss(
        focal_weight=1.0, supcon_weight=0.5, lm_weight=2.0, focal_gamma=2.0, focal_alpha=[1, 2, 1, 1], temperature=0.1
    )
    out = crit(logits=logits, labels=labels, features=feats, lm_loss=lm)
    assert isinstance(out, MALOutput)
    focal = focal_loss(logits, labels, 2.0, [1, 2, 1, 1])
    keep = labels != -100
    supcon = torch.tensor(ref_supcon(feats[keep].detach(), labels[keep], 0.1), dtype=torch.float64)
    torch.testing.assert_close(out.focal, focal)
    torch.testing.assert_close(out.supcon, supcon, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, focal + 0.5 * supcon + 2.0 * lm, atol=ATOL, rtol=0)
    out.loss.backward()
    assert logits.grad[2].abs().sum() == 0 and feats.grad[2].abs().sum() == 0  # ignored row
    assert lm.grad.item() == 2.0 and feats.grad.abs().sum() > 0


def test_maloss_skips_zero_weight_and_missing_inputs():
    logits = _feats(4, d=3)
    labels = torch.tensor([0, 1, 1, 2])
    out = MALoss(supcon_weight=0.0)(logits=logits, labels=labels, features=_feats(4))
    assert out.supcon is None and out.lm is None
    torch.testing.assert_close(out.loss, out.focal)
    only_lm = MALoss()(lm_loss=torch.tensor(0.7))
    assert only_lm.focal is None and only_lm.supcon is None and only_lm.loss.item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="nothing to compute"):
        MALoss(lm_weight=0.0)(lm_loss=torch.tensor(1.0))
