"""FLOPs counted by torch's counter on meta copies, checked by hand; peak FLOP/s sources."""
import pytest
import timm
import torch
from torch import nn

from fastdeit import flops


def test_linear_layers_by_hand():
    # Per image, a Linear(i -> o) costs 2*i*o forward (multiply + add), 2*i*o for the weight
    # gradient and 2*i*o for the input gradient. The first layer's input needs no gradient.
    a, b, c = 10, 20, 7
    model = nn.Sequential(nn.Flatten(), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    fwd = 2 * a * b + 2 * b * c
    train = 2 * (2 * a * b) + 3 * (2 * b * c)
    assert flops.count_flops(model, img_size=1, train=False, in_chans=a) == fwd
    assert flops.count_flops(model, img_size=1, train=True, in_chans=a) == train
    # The batch used for counting does not change the per-image figure.
    assert flops.count_flops(model, img_size=1, train=True, in_chans=a, batch=5) == train


def test_conv_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)     # a patch embedding: 8x8 input -> 2x2
    per_image = 2 * (3 * 4 * 4) * 8 * (2 * 2)
    assert flops.count_flops(conv, img_size=8, train=False) == per_image


def _vit(depth=2, dim=64, img=32, patch=8, distilled=False):
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    return timm.create_model(name, img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                             num_heads=2, num_classes=10)


def test_vit_scaling():
    base = flops.count_flops(_vit(depth=2), 32, train=False)
    deeper = flops.count_flops(_vit(depth=4), 32, train=False)
    embed_and_head = 2 * base - deeper                  # the part that does not grow with depth
    assert 0 < embed_and_head < base / 4
    # Wider: every block matmul grows 4x (dim^2); attention scores only 2x (dim x tokens^2).
    wide = flops.count_flops(_vit(dim=128), 32, train=False)
    assert 3.0 * base < wide < 4.0 * base
    # Training = 3x the forward, less the patch embedding's input gradient, which is not needed.
    train = flops.count_flops(_vit(depth=2), 32, train=True)
    patch_embed = 2 * (3 * 8 * 8) * 64 * (32 // 8) ** 2    # conv 8x8/8, 64 channels, 16 patches
    assert train == 3 * base - patch_embed


def test_deit_base_matches_published_macs():
    # timm / the DeiT paper: DeiT-B at 224 is 17.6 GMACs = 35.1 GFLOPs per image forward.
    model = timm.create_model("deit_base_patch16_224")
    assert flops.count_flops(model, 224, train=False) == pytest.approx(35.13e9, rel=0.01)


def test_teacher_forward_is_added_and_meta_copy_is_harmless():
    student = _vit(distilled=True)
    student.set_distilled_training(True)              # returns (cls, dist) logits: both summed
    teacher = timm.create_model("resnet10t", num_classes=10).to(torch.bfloat16).eval()
    rng = torch.get_rng_state()
    alone = flops.train_flops_per_image(student, 32)
    both = flops.train_flops_per_image(student, 32, teacher)
    assert both - alone == pytest.approx(flops.count_flops(teacher, 32, train=False))
    # Nothing was allocated, stepped or drawn on the real modules.
    assert all(p.grad is None for p in student.parameters())
    assert student.training and not teacher.training
    assert torch.equal(torch.get_rng_state(), rng)


# torch.cuda.get_device_name() of each board -> NVIDIA's dense bf16 figure (half the data
# sheet's "with sparsity" one; V100: fp16).
DEVICE_NAMES = [
    ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA GH200 144G HBM3e", 989.0),
    ("NVIDIA B200", 2250.0),
    ("Tesla V100-SXM2-32GB", 125.0), ("Tesla V100-PCIE-32GB", 112.0),
    # Unknown parts fall back to a measured matmul; look-alike names must not borrow a figure.
    ("NVIDIA GeForce RTX 4090", None), ("NVIDIA GB200", None), ("NVIDIA H800", None),
]


@pytest.mark.parametrize("name,tflops", DEVICE_NAMES)
def test_datasheet_peaks(name, tflops):
    assert flops.known_peak_tflops(name) == tflops
    assert flops.known_peak_tflops(name.lower()) == tflops      # case does not matter


def test_peak_sources():
    assert flops.peak_flops(torch.device("cpu"), 2.5) == (2.5e12, "given")
    measured, source = flops.peak_flops(torch.device("cpu"))
    # Any CPU sustains well over 0.1 GFLOP/s in bf16, even with other jobs on its cores (a
    # loaded 2-core host measured 0.4, so 1 GFLOP/s was too tight a floor).
    assert measured > 1e8 and source.startswith("measured")
    with pytest.raises(ValueError):
        flops.peak_flops(torch.device("cpu"), 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak_is_known_or_measured():
    peak, source = flops.peak_flops(torch.device("cuda"))
    assert peak > 1e13, source
