"""DeiT losses against hand computations (plain Python over the tensor entries)."""
import math

import pytest
import torch

from fastdeit.losses import DeiTLoss, DistillConfig

B, C = 4, 6


def logsoftmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def soft_ce(logits, targets):
    return sum(-sum(t * l for t, l in zip(trow, logsoftmax_row(lrow)))
               for lrow, trow in zip(logits.tolist(), targets.tolist())) / len(logits)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(B, C, generator=g) * 2
    dist = torch.randn(B, C, generator=g) * 2
    teacher = torch.randn(B, C, generator=g) * 3
    targets = torch.softmax(torch.randn(B, C, generator=g), dim=1)   # soft, rows sum to 1
    return cls, dist, teacher, targets


def test_none(batch):
    cls, _, _, targets = batch
    loss, _ = DeiTLoss(DistillConfig(type="none"))(cls, targets)
    assert loss.item() == pytest.approx(soft_ce(cls, targets), rel=1e-5)


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 3.0)])
def test_soft(batch, alpha, tau):
    cls, dist, teacher, targets = batch
    loss, parts = DeiTLoss(DistillConfig(type="soft", alpha=alpha, tau=tau))((cls, dist), targets, teacher)
    kl = 0.0
    for srow, trow in zip((dist / tau).tolist(), (teacher / tau).tolist()):
        ls, lt = logsoftmax_row(srow), logsoftmax_row(trow)
        kl += sum(math.exp(t) * (t - s) for s, t in zip(ls, lt))
    kd = kl * tau * tau / (B * C)          # the reference divides the summed KL by numel
    expected = (1 - alpha) * soft_ce(cls, targets) + alpha * kd
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["loss_dist"].item() == pytest.approx(kd, rel=1e-5)


def test_hard(batch):
    cls, dist, teacher, targets = batch
    loss, _ = DeiTLoss(DistillConfig(type="hard", alpha=0.5))((cls, dist), targets, teacher)
    hard = [max(range(C), key=lambda c: row[c]) for row in teacher.tolist()]
    ce = -sum(logsoftmax_row(row)[y] for row, y in zip(dist.tolist(), hard)) / B
    assert loss.item() == pytest.approx(0.5 * soft_ce(cls, targets) + 0.5 * ce, rel=1e-5)


def test_bf16_logits_are_computed_in_fp32(batch):
    cls, dist, teacher, targets = batch
    crit = DeiTLoss(DistillConfig(type="hard"))
    loss, _ = crit((cls.bfloat16(), dist.bfloat16()), targets, teacher.bfloat16())
    assert loss.dtype == torch.float32


def test_misuse_is_explicit(batch):
    cls, dist, teacher, targets = batch
    with pytest.raises(ValueError, match="distillation head"):
        DeiTLoss(DistillConfig(type="hard"))(cls, targets, teacher)
    with pytest.raises(ValueError, match="no teacher logits"):
        DeiTLoss(DistillConfig(type="soft"))((cls, dist), targets)
    with pytest.raises(ValueError, match="alpha"):
        DeiTLoss(DistillConfig(alpha=1.5))
