import math

import pytest
import torch

from tinydistill.losses import DistillLoss, mixed_labels, soft_cross_entropy


def test_soft_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    target = torch.tensor([[0.5, 0.5, 0.0]])
    z = math.log(math.exp(2) + 2)
    assert soft_cross_entropy(logits, target).item() == pytest.approx(0.5 * (z - 2) + 0.5 * z, rel=1e-6)


def test_tinyvit_sparse_soft_ce_by_hand():
    # teacher top-2 of 4 classes: p = 0.7 (class 2), 0.2 (class 0); rest 0.1 / 2 each on classes 1 and 3
    logits = torch.tensor([[1.0, 0.0, 3.0, -1.0]])
    lsm = torch.log_softmax(logits, -1)[0].tolist()
    want = -(0.2 * lsm[0] + 0.05 * lsm[1] + 0.7 * lsm[2] + 0.05 * lsm[3])
    loss = DistillLoss(4)(logits, torch.log(torch.tensor([[0.7, 0.2]])), torch.tensor([[2, 0]]))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_kl_with_temperature_by_hand():
    logits = torch.tensor([[1.0, 0.0, 3.0, -1.0]])
    t = 2.0
    q = torch.tensor([0.2, 0.05, 0.7, 0.05]) ** (1 / t)
    q = q / q.sum()
    s = torch.log_softmax(logits[0] / t, -1)
    want = (q * (q.log() - s)).sum().item() * t * t
    loss = DistillLoss(4, kind="kl", temperature=t)(logits, torch.log(torch.tensor([[0.7, 0.2]])), torch.tensor([[2, 0]]))
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_alpha_ground_truth_term_and_hard():
    logits = torch.tensor([[1.0, 0.0, 3.0, -1.0]])
    logp, index = torch.log(torch.tensor([[0.7, 0.2]])), torch.tensor([[2, 0]])
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    ce_y = -torch.log_softmax(logits, -1)[0, 1].item()
    kd = DistillLoss(4)(logits, logp, index).item()
    assert DistillLoss(4, alpha=0.3)(logits, logp, index, y).item() == pytest.approx(0.7 * ce_y + 0.3 * kd, rel=1e-6)
    ce_top1 = -torch.log_softmax(logits, -1)[0, 2].item()  # teacher top-1 is class 2
    assert DistillLoss(4, kind="hard")(logits, logp, index, y).item() == pytest.approx(0.5 * ce_y + 0.5 * ce_top1, rel=1e-6)


def test_mixed_labels():
    y = mixed_labels(torch.tensor([1, 2]), torch.tensor([3, 2]), torch.tensor([0.25, 1.0]), 4)
    torch.testing.assert_close(y, torch.tensor([[0, 0.25, 0, 0.75], [0, 0, 1.0, 0]]))
    ys = mixed_labels(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), 4, smoothing=0.1)
    torch.testing.assert_close(ys, torch.tensor([[0.925, 0.025, 0.025, 0.025]]))


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# two views, top-2 of 4 classes each; the other two classes share the rest evenly (dense_targets)
SPARSE_LOGP = torch.log(torch.tensor([[0.7, 0.2], [0.5, 0.3]]))
SPARSE_INDEX = torch.tensor([[2, 0], [1, 3]])
DENSE = torch.tensor([[0.2, 0.05, 0.7, 0.05], [0.1, 0.5, 0.1, 0.3]])
LOGITS = torch.tensor([[1.0, 0.0, 3.0, -1.0], [0.5, 2.0, -0.5, 0.0]])


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_dist_equals_a_dense_computation_by_hand(t):
    q = DENSE ** (1 / t)
    q = q / q.sum(1, keepdim=True)  # the teacher at temperature t, as soft_ce and kl see it
    s = torch.softmax(LOGITS / t, -1)
    inter = 1 - sum(_pearson(s[i], q[i]) for i in range(2)) / 2  # per view, across classes
    intra = 1 - sum(_pearson(s[:, c], q[:, c]) for c in range(4)) / 4  # per class, across the batch
    for beta, gamma in [(1.0, 1.0), (2.0, 0.5)]:
        loss = DistillLoss(4, kind="dist", temperature=t, dist_beta=beta, dist_gamma=gamma)(LOGITS, SPARSE_LOGP,
                                                                                           SPARSE_INDEX)
        assert loss.item() == pytest.approx(t * t * (beta * inter + gamma * intra), rel=1e-5)
    # a student whose probabilities are the teacher's has nothing left to learn
    assert DistillLoss(4, kind="dist")(DENSE.log(), SPARSE_LOGP, SPARSE_INDEX).item() == pytest.approx(0, abs=1e-6)


def test_bce_equals_a_dense_computation_by_hand():
    sig = torch.sigmoid(LOGITS)
    want = -(DENSE * sig.log() + (1 - DENSE) * (1 - sig).log()).mean().item()  # mean over views and classes
    assert DistillLoss(4, kind="bce")(LOGITS, SPARSE_LOGP, SPARSE_INDEX).item() == pytest.approx(want, rel=1e-6)
    # with a ground-truth term, as the other losses
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    ce = soft_cross_entropy(LOGITS, y).item()
    got = DistillLoss(4, kind="bce", alpha=0.25)(LOGITS, SPARSE_LOGP, SPARSE_INDEX, y).item()
    assert got == pytest.approx(0.75 * ce + 0.25 * want, rel=1e-6)


@pytest.mark.parametrize("kind", ["dist", "bce"])
def test_new_losses_send_gradients_to_every_logit(kind):
    logits = LOGITS.clone().requires_grad_(True)
    loss = DistillLoss(4, kind=kind)(logits, SPARSE_LOGP, SPARSE_INDEX)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad != 0).all()
    with torch.no_grad():  # a small step down the gradient lowers the loss
        lower = DistillLoss(4, kind=kind)(logits - 0.1 * logits.grad, SPARSE_LOGP, SPARSE_INDEX)
    assert lower.item() < loss.item()
