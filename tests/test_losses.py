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


# --------------------------------------------------------------------------- BCE (DeiT III)

def bce_by_hand(logits, targets):
    """Mean over all B*C entries of -(y log s(z) + (1 - y) log(1 - s(z)))."""
    total, n = 0.0, 0
    for zrow, yrow in zip(logits.tolist(), targets.tolist()):
        for z, y in zip(zrow, yrow):
            s = 1 / (1 + math.exp(-z))
            total -= y * math.log(s) + (1 - y) * math.log(1 - s)
            n += 1
    return total / n


def mixed_targets():
    """CutMix-mixed targets as the DeiT III reference makes them: timm Mixup, no smoothing."""
    from timm.data import Mixup

    torch.manual_seed(0)
    import numpy as np
    np.random.seed(0)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=C)
    _, targets = mix(torch.zeros(B, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    return targets


def test_bce_binarises_the_mixed_targets_like_the_reference(batch):
    from timm.loss import BinaryCrossEntropy

    from fastdeit.losses import LossConfig

    cls = batch[0]
    targets = mixed_targets()
    assert ((targets > 0).sum(dim=1) == 2).all()             # two classes in every blend
    binary = targets.gt(0.0).float()                          # the reference's engine.py
    loss, parts = DeiTLoss(DistillConfig(type="none"), LossConfig(base="bce"))(cls, targets)
    assert loss.item() == pytest.approx(bce_by_hand(cls, binary), rel=1e-6)
    assert loss.item() == pytest.approx(torch.nn.BCEWithLogitsLoss()(cls, binary).item(), rel=1e-6)
    assert loss.item() == pytest.approx(BinaryCrossEntropy(target_threshold=0.0)(cls, targets).item(), rel=1e-6)
    # null threshold: BCE on the soft targets as they are
    soft, _ = DeiTLoss(DistillConfig(type="none"), LossConfig(base="bce", bce_target_threshold=None))(cls, targets)
    assert soft.item() == pytest.approx(bce_by_hand(cls, targets), rel=1e-6)


def test_bce_composes_with_hard_distillation(batch):
    """(1 - a) BCE(cls, binarised y) + a CE(dist, argmax teacher): DeiT III + distillation."""
    from fastdeit.losses import LossConfig

    cls, dist, teacher, _ = batch
    targets = mixed_targets()
    loss, parts = DeiTLoss(DistillConfig(type="hard", alpha=0.5), LossConfig(base="bce"))((cls, dist), targets, teacher)
    hard = [lr[int(t)] for lr, t in zip((logsoftmax_row(r) for r in dist.tolist()), teacher.argmax(1))]
    kd = -sum(hard) / B
    bce = bce_by_hand(cls, targets.gt(0).float())
    assert parts["loss_cls"].item() == pytest.approx(bce, rel=1e-6)
    assert parts["loss_dist"].item() == pytest.approx(kd, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * bce + 0.5 * kd, rel=1e-6)


def test_bce_with_smoothing_at_threshold_zero_is_refused():
    from fastdeit.losses import LossConfig, check_loss_targets

    check_loss_targets(LossConfig(base="bce"), 0.0, 1000)                 # DeiT III: fine
    check_loss_targets(LossConfig(base="ce"), 0.1, 1000)                  # DeiT: fine
    check_loss_targets(LossConfig(base="bce", bce_target_threshold=0.2), 0.1, 1000)
    with pytest.raises(ValueError, match="every target would be 1"):
        check_loss_targets(LossConfig(base="bce"), 0.1, 1000)
