"""Matcher, sampler, targets and the four losses against torchvision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import ops
from frcnn_jax.modeling.matcher import match
from frcnn_jax.modeling.roi_heads import box_head_loss, box_head_targets
from frcnn_jax.modeling.rpn import rpn_loss, rpn_targets
from frcnn_jax.modeling.sampler import sample_balanced, sampled_indices
from frcnn_jax.testing.inputs import random_boxes


def _pad(a, n, value=0):
    out = np.full((n,) + a.shape[1:], value, a.dtype)
    out[: len(a)] = a
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("low_quality", [True, False])
def test_matcher_matches_torchvision(torch, seed, low_quality):
    from torchvision.models.detection._utils import Matcher

    rng = np.random.default_rng(seed)
    g, n = int(rng.integers(1, 12)), 500
    gt = random_boxes(rng, g, 300, 300, min_size=10, max_size=150)
    anchors = random_boxes(rng, n, 300, 300, min_size=10, max_size=150)
    anchors[:20] = np.repeat(gt[:1], 20, axis=0)  # exact ties for the low-quality rule
    iou = np.array(ops.box_iou(gt, anchors))
    ref = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(torch.from_numpy(iou)).numpy()
    got = match(jnp.asarray(_pad(iou, 16, 0.9)), jnp.arange(16) < g, 0.7, 0.3, low_quality)
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_matcher_without_ground_truth_is_all_background():
    got = match(jnp.zeros((4, 10)), jnp.zeros(4, bool), 0.7, 0.3, True)
    np.testing.assert_array_equal(got, -1)


@pytest.mark.parametrize("num_pos,num_neg", [(0, 0), (3, 1000), (500, 2000), (500, 10)])
def test_sampler_counts_and_membership(num_pos, num_neg):
    n = 3000
    labels = np.full(n, -1, np.int32)
    perm = np.random.default_rng(0).permutation(n)
    labels[perm[:num_pos]] = 1 + perm[:num_pos] % 3
    labels[perm[num_pos : num_pos + num_neg]] = 0
    pos, neg = jax.jit(lambda k, lab: sample_balanced(k, lab, 256, 0.5))(jax.random.key(1), labels)
    pos, neg = np.asarray(pos), np.asarray(neg)
    want_pos = min(num_pos, 128)
    assert pos.sum() == want_pos and neg.sum() == min(num_neg, 256 - want_pos)
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    idx, valid = sampled_indices(jnp.asarray(pos), jnp.asarray(neg), 256)
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert valid.sum() == pos.sum() + neg.sum()
    assert set(idx[valid]) == set(np.nonzero(pos | neg)[0])
    assert (np.diff(valid.astype(int)) <= 0).all(), "valid samples come first"


def test_sampler_is_uniform_and_keyed():
    labels = np.zeros(40, np.int32)
    labels[:10] = 1
    counts = np.zeros(40)
    fn = jax.jit(jax.vmap(lambda k: sample_balanced(k, labels, 8, 0.5)))
    pos, neg = fn(jax.random.split(jax.random.key(0), 4000))
    counts = np.asarray(pos).sum(0) + np.asarray(neg).sum(0)
    np.testing.assert_allclose(counts[:10] / 4000, 4 / 10, atol=0.03)  # each positive: 4 of 10
    np.testing.assert_allclose(counts[10:] / 4000, 4 / 30, atol=0.03)  # each negative: 4 of 30
    a = fn(jax.random.split(jax.random.key(0), 3))
    b = fn(jax.random.split(jax.random.key(0), 3))
    np.testing.assert_array_equal(a[0], b[0])


def test_rpn_targets_match_torchvision(torch):
    from torchvision.models.detection._utils import BoxCoder, Matcher

    rng = np.random.default_rng(3)
    anchors = np.asarray(ops.generate_anchors((25, 34), 16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)))
    gt = random_boxes(rng, 7, 400, 544, min_size=16, max_size=300)
    gt[:, 0::2] = gt[:, 0::2].clip(0, 544)
    gt[:, 1::2] = gt[:, 1::2].clip(0, 400)
    t = rpn_targets(
        jax.random.key(0), jnp.asarray(anchors), jnp.asarray(_pad(gt, 12)), jnp.arange(12) < 7,
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
    )  # fmt: skip
    matched = Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.from_numpy(np.array(ops.box_iou(gt, anchors))))
    ref_labels = np.where(matched >= 0, 1, np.where(matched == -1, 0, -1))
    np.testing.assert_array_equal(np.asarray(t["labels"]), ref_labels)
    ref_targets = (
        BoxCoder((1.0, 1.0, 1.0, 1.0))
        .encode_single(torch.from_numpy(gt)[matched.clamp(min=0)], torch.from_numpy(anchors))
        .numpy()
    )
    pos = ref_labels == 1
    np.testing.assert_allclose(np.asarray(t["targets"])[pos], ref_targets[pos], rtol=1e-5, atol=1e-5)
    assert np.asarray(t["positive"]).sum() == min(pos.sum(), 128)


def test_box_head_targets_match_torchvision(torch):
    from torchvision.models.detection._utils import BoxCoder, Matcher

    rng = np.random.default_rng(4)
    props = random_boxes(rng, 300, 400, 544, min_size=8, max_size=300)
    gt = random_boxes(rng, 5, 400, 544, min_size=16, max_size=300)
    labels = np.array([3, 1, 2, 5, 4], np.int32)
    t = box_head_targets(
        jax.random.key(0), jnp.asarray(props), jnp.ones(300, bool), jnp.asarray(_pad(gt, 8)),
        jnp.asarray(_pad(labels, 8)), jnp.arange(8) < 5, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=64, positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    # torchvision: proposals + gt, Matcher(0.5, 0.5), labels, encode with (10, 10, 5, 5)
    cand = np.concatenate([props, gt])
    m = Matcher(0.5, 0.5, allow_low_quality_matches=False)(torch.from_numpy(np.array(ops.box_iou(gt, cand)))).numpy()
    ref_labels = np.where(m >= 0, labels[np.maximum(m, 0)], 0)
    idx, valid = np.asarray(t["index"]), np.asarray(t["valid"])
    assert valid.all()
    np.testing.assert_array_equal(np.asarray(t["labels"]), ref_labels[idx])
    np.testing.assert_array_equal(np.asarray(t["boxes"]), cand[idx])
    assert (ref_labels[idx] > 0).sum() == min((ref_labels > 0).sum(), 16)
    ref_t = (
        BoxCoder((10.0, 10.0, 5.0, 5.0))
        .encode_single(torch.from_numpy(gt[np.maximum(m, 0)]), torch.from_numpy(cand))
        .numpy()
    )
    fg = ref_labels[idx] > 0
    np.testing.assert_allclose(np.asarray(t["targets"])[fg], ref_t[idx][fg], rtol=1e-5, atol=1e-5)
    assert (np.asarray(t["targets"])[~fg] == 0).all()


def test_image_without_ground_truth():
    t = box_head_targets(
        jax.random.key(0), jnp.asarray(random_boxes(np.random.default_rng(0), 50)), jnp.ones(50, bool),
        jnp.zeros((4, 4)), jnp.zeros(4, jnp.int32), jnp.zeros(4, bool), fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=32, positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    assert int(t["valid"].sum()) == 32 and int((t["labels"] > 0).sum()) == 0
    assert np.isfinite(np.asarray(t["targets"])).all()


def test_rpn_loss_matches_torchvision(torch):
    """Identical inputs and identical sampled anchors -> torchvision's RPN compute_loss."""
    import torchvision
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    rng = np.random.default_rng(5)
    b, n = 2, 3000
    obj = rng.normal(0, 2, (b, n)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (b, n, 4)).astype(np.float32)
    labels = rng.choice([-1, 0, 1], size=(b, n), p=[0.3, 0.65, 0.05]).astype(np.int32)
    targets = rng.normal(0, 0.3, (b, n, 4)).astype(np.float32)
    pos, neg = jax.vmap(lambda k, lab: sample_balanced(k, lab, 256, 0.5))(
        jax.random.split(jax.random.key(0), b), labels
    )
    pos, neg = np.asarray(pos), np.asarray(neg)
    targets = np.where(pos[..., None], targets, 0)
    ours = rpn_loss(jnp.asarray(obj), jnp.asarray(deltas), {"targets": targets, "positive": pos, "negative": neg})

    rpn = RegionProposalNetwork(None, RPNHead(4, 3), 0.7, 0.3, 256, 0.5, {}, {}, 0.7)
    rpn.fg_bg_sampler = lambda _labels: ([torch.from_numpy(p) for p in pos], [torch.from_numpy(q) for q in neg])
    ref = rpn.compute_loss(
        torch.from_numpy(obj.reshape(-1)), torch.from_numpy(deltas.reshape(-1, 4)),
        [torch.from_numpy(lab.astype(np.float32)) for lab in np.where(labels == 1, 1, np.where(labels == 0, 0, -1))],
        [torch.from_numpy(t) for t in targets],
    )  # fmt: skip
    np.testing.assert_allclose([float(x) for x in ours], [float(x) for x in ref], rtol=1e-5)
    assert torchvision is not None


@pytest.mark.parametrize("beta", [1.0 / 9, 1.0])
def test_box_head_loss_matches_torchvision(torch, beta):
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    rng = np.random.default_rng(6)
    b, s, k = 2, 64, 7
    logits = rng.normal(0, 2, (b, s, k)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (b, s, k, 4)).astype(np.float32)
    labels = rng.integers(0, k, (b, s)).astype(np.int32)
    labels[:, ::3] = 0
    tgt = np.where((labels > 0)[..., None], rng.normal(0, 0.5, (b, s, 4)), 0).astype(np.float32)
    ours = box_head_loss(
        jnp.asarray(logits),
        jnp.asarray(deltas),
        {"labels": labels, "targets": tgt, "valid": np.ones((b, s), bool)},
        beta=beta,
    )
    tl, td = torch.from_numpy(logits.reshape(-1, k)), torch.from_numpy(deltas.reshape(-1, k * 4))
    lab = [torch.from_numpy(x.astype(np.int64)) for x in labels]
    tt = [torch.from_numpy(t) for t in tgt]
    if beta == 1.0 / 9:  # torchvision's own function uses beta 1/9
        ref = fastrcnn_loss(tl, td, lab, tt)
    else:  # maskrcnn-benchmark: the same with beta 1
        flat = torch.cat(lab)
        p = torch.where(flat > 0)[0]
        box = (
            F.smooth_l1_loss(td.reshape(-1, k, 4)[p, flat[p]], torch.cat(tt)[p], beta=1.0, reduction="sum")
            / flat.numel()
        )
        ref = (F.cross_entropy(tl, flat), box)
    np.testing.assert_allclose([float(x) for x in ours], [float(x) for x in ref], rtol=1e-5)


def test_losses_have_finite_gradients_on_padding():
    """Masked entries (padding, unsampled) contribute neither value nor NaN gradient."""
    obj = jnp.zeros((1, 10))
    deltas = jnp.zeros((1, 10, 4))
    t = {
        "targets": jnp.full((1, 10, 4), jnp.nan).at[0, 0].set(0.1),
        "positive": jnp.arange(10)[None] == 0,
        "negative": jnp.arange(10)[None] == 1,
    }
    g = jax.grad(
        lambda o, d: sum(rpn_loss(o, d, {**t, "targets": jnp.where(t["positive"][..., None], t["targets"], 0.0)})),
        argnums=(0, 1),
    )(obj, deltas)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


LOSS_DTYPES = ["float32", "float64"] if jax.config.read("jax_enable_x64") else ["float32"]


@pytest.mark.parametrize("dtype", LOSS_DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0 / 9, 1.0])
def test_elementwise_losses_and_gradients_match_torch(torch, dtype, beta):
    """ops.losses (optax underneath) against torch's smooth_l1 / BCE-with-logits / cross-entropy, values and grads."""
    import torch.nn.functional as F

    from frcnn_jax.ops import losses

    rng = np.random.default_rng(8)
    x = rng.normal(0, 0.5, (64, 4)).astype(dtype)
    x[0, :2] = [beta, -beta]  # the boundary |x| == beta
    logits = rng.normal(0, 4, (64, 5)).astype(dtype)
    y = (rng.random(64) < 0.3).astype(dtype)
    labels = rng.integers(0, 5, 64).astype(np.int32)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-14}

    def torch_value_and_grad(fn, *args):
        t = torch.from_numpy(args[0]).requires_grad_(True)
        out = fn(t, *args[1:])
        out.sum().backward()
        return out.detach().numpy(), t.grad.numpy()

    cases = [
        (lambda v: losses.smooth_l1(v, beta), lambda t: F.smooth_l1_loss(t, torch.zeros_like(t), reduction="none", beta=beta), x),
        (lambda v: losses.sigmoid_binary_cross_entropy(v, y), lambda t: F.binary_cross_entropy_with_logits(t, torch.from_numpy(y), reduction="none"), logits[:, 0]),
        (lambda v: losses.softmax_cross_entropy(v, labels), lambda t: F.cross_entropy(t, torch.from_numpy(labels.astype(np.int64)), reduction="none"), logits),
    ]  # fmt: skip
    for ours, ref, arg in cases:
        grad = jax.jit(jax.grad(lambda v, ours=ours: ours(v).sum()))(arg)
        out = jax.jit(ours)(arg)
        ref_out, ref_grad = torch_value_and_grad(ref, arg)
        assert out.dtype == dtype and grad.dtype == dtype
        np.testing.assert_allclose(np.asarray(out), ref_out, **tol)
        np.testing.assert_allclose(np.asarray(grad), ref_grad, **tol)
