"""FLOPs per trained image, counted by torch's FLOP counter, and the peak FLOP/s that MFU divides by.

MFU = achieved FLOP/s / peak FLOP/s, where achieved = images/sec x FLOPs per image. FLOPs per
image are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` sums the matmul,
convolution and attention FLOPs (2 per multiply-add) of one real forward and backward. Norms,
activations, softmax and the optimizer are not counted, the usual MFU convention (PaLM, nanoGPT).

Counting runs on a *meta-device copy* of the model: no memory, no kernels, no RNG draws, no
gradient hooks touched, so it is safe on a model that is already on the GPU and about to be
wrapped by DeepSpeed, and it takes well under a second even for DeiT-B. For a ViT the backward
costs twice the forward except for the patch embedding, which gets no input gradient, so a
training step is just under 3x the forward FLOPs (DeiT-B at 224: 35.1 GFLOPs forward, 105.2
forward + backward per image).
"""
from __future__ import annotations

import copy
import re
import time
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastdeit.errors import ConfigError

# Dense bf16 tensor-core peaks per GPU, TFLOP/s, from NVIDIA's data sheets. The sheets print
# the 2:4-sparsity figure with a footnote ("with sparsity"); MFU divides by the dense one, half of
# it. V100 has no bf16: its figure is the fp16 tensor-core one.
#   A100 data sheet (nvidia.com/en-us/data-center/a100): BF16 312 / 624 sparse, the same for
#     the 40 GB and 80 GB boards, PCIe and SXM.
#   H100 data sheet (nvidia.com/en-us/data-center/h100): SXM 1,979 sparse -> 989; NVL (94 GB,
#     per GPU) 1,671 -> 835; PCIe (80 GB, the 2022 sheet's third column) 1,513 -> 756.
#   H200 data sheet (nvidia.com/en-us/data-center/h200): SXM 1,979 -> 989; NVL 1,671 -> 835.
#   GH200 Grace Hopper Superchip data sheet: its Hopper GPU's BF16 1,979 sparse -> 989.
#   HGX B200 (nvidia.com/en-us/data-center/hgx): FP16/BF16 36 PFLOPS sparse for 8 GPUs ->
#     4.5 per GPU sparse -> 2,250 dense.
#   V100 data sheet: fp16 tensor 125 (SXM2), 112 (PCIe).
# Matched against torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA
# H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA B200",
# "Tesla V100-SXM2-32GB": case-insensitive, on whole words (so "GH200" is not an "H200" and
# "GB200", whose figure differs, is not a "B200"); the first pattern that matches wins, so the
# NVL and PCIe boards come before their SXM sibling.
KNOWN_PEAK_TFLOPS: Tuple[Tuple[str, float], ...] = (
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.0),               # SXM5 ("H100 80GB HBM3", "H100 SXM5 ...")
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),               # SXM
    (r"\bGH200\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),               # 40/80 GB, SXM4 and PCIe alike
    (r"\bV100\b.*\bPCIe\b", 112.0),
    (r"\bV100\b", 125.0),               # SXM2
)


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device.

    Parameters and buffers are pre-seeded in deepcopy's memo, so the real tensors are never
    copied (nothing is allocated on the module's device).
    """
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _input_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def count_flops(module: nn.Module, img_size: int, train: bool, batch: int = 2, in_chans: int = 3) -> float:
    """FLOPs per image of one forward (``train=False``, under no_grad, eval mode) or one forward
    plus backward (``train=True``, train mode, gradients for every trainable parameter).

    ``batch`` 2 rather than 1 so that nothing batch-size dependent hides (the count is linear).
    """
    model = meta_copy(module)
    model.train(train)
    x = torch.empty(batch, in_chans, img_size, img_size, device="meta", dtype=_input_dtype(model))
    with FlopCounterMode(display=False) as counter:
        if train:
            out = model(x)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            # Any scalar of all outputs: the backward FLOPs do not depend on the loss.
            sum(o.float().sum() for o in outs).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / batch


def train_flops_per_image(student: nn.Module, img_size: int, teacher: Optional[nn.Module] = None) -> float:
    """FLOPs per image of one training step: student forward + backward, plus the frozen
    teacher's forward when distilling (the teacher has no backward)."""
    flops = count_flops(student, img_size, train=True)
    if teacher is not None:
        flops += count_flops(teacher, img_size, train=False)
    return flops


def train_flops_by_size(student: nn.Module, sizes, teacher: Optional[nn.Module] = None) -> Dict[int, float]:
    """{size: FLOPs per trained image at that input side} for every size of a resolution
    schedule (data.size_schedule): MFU is recomputed per epoch from the epoch's size. A ViT's
    cost grows faster than the token count (attention is quadratic in it), so the counts are
    taken at each size rather than scaled."""
    return {int(s): train_flops_per_image(student, int(s), teacher) for s in dict.fromkeys(sizes)}


# --------------------------------------------------------------------------- peak FLOP/s


def known_peak_tflops(device_name: str) -> Optional[float]:
    """The data-sheet dense bf16 TFLOP/s of a GPU named as torch names it, or None."""
    for pattern, tflops in KNOWN_PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                         size: Optional[int] = None, seconds: Optional[float] = None) -> float:
    """Best observed FLOP/s of a square ``dtype`` matmul on ``device``: what this device
    actually sustains on the op that dominates a ViT, a fair (if slightly generous to us, since
    it is below the datasheet) ceiling where no datasheet figure is known, e.g. a CPU."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    seconds = seconds if seconds is not None else (0.3 if device.type == "cuda" else 0.6)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, thread pool start
    _sync(device)
    best, spent, reps = 0.0, 0.0, 1
    while spent < seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2.0 * n ** 3 * reps / dt)
        reps = min(reps * 2, 64)
    return best


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Tuple[float, str]:
    """(peak FLOP/s per device, where the figure came from) for MFU.

    An explicit figure wins; then the datasheet table for known GPUs; then a measured bf16
    matmul (CPUs, unknown GPUs).
    """
    device = torch.device(device)
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops: peak TFLOP/s must be positive, got {override_tflops}")
        return override_tflops * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = known_peak_tflops(name)
        if tflops is not None:
            return tflops * 1e12, f"datasheet ({name}, dense bf16)"
    return measure_matmul_flops(device), "measured (bf16 matmul)"
