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

# Dense peaks per GPU, TFLOP/s, from NVIDIA's data sheets, for the dtype a run computes in:
# "bf16" (tensor cores), "tf32" (an fp32 run whose matmuls may use TF32 tensor cores,
# torch.get_float32_matmul_precision() != "highest") and "fp32" (plain fp32 CUDA cores, torch's
# default for fp32 matmuls). The sheets print the 2:4-sparsity tensor-core figures with a
# footnote ("with sparsity"); MFU divides by the dense one, half of it. V100 has neither bf16
# nor TF32: its "bf16" figure is the fp16 tensor-core one, and an fp32 run there uses "fp32".
#   A100 data sheet (nvidia.com/en-us/data-center/a100): BF16 312 / 624 sparse, TF32 156 / 312
#     sparse, FP32 19.5; the same for the 40 GB and 80 GB boards, PCIe and SXM.
#   H100 data sheet (nvidia.com/en-us/data-center/h100): SXM BF16 1,979 sparse -> 989, TF32 989
#     sparse -> 494.5, FP32 67; NVL (94 GB, per GPU) 1,671 -> 835, 835 -> 417.5, FP32 60; PCIe
#     (80 GB, the 2022 sheet's third column) 1,513 -> 756, 756 -> 378, FP32 51.
#   H200 data sheet (nvidia.com/en-us/data-center/h200): SXM as H100 SXM; NVL as H100 NVL.
#   GH200 Grace Hopper Superchip data sheet: its Hopper GPU as H100 SXM.
#   HGX B200 (nvidia.com/en-us/data-center/hgx), 8 GPUs: FP16/BF16 36 PFLOPS sparse -> 2,250
#     dense per GPU; TF32 18 PFLOPS sparse -> 1,125 dense per GPU; FP32 600 TFLOPS -> 75 per GPU.
#   V100 data sheet: fp16 tensor 125 (SXM2), 112 (PCIe); FP32 15.7 (SXM2), 14 (PCIe).
# Matched against torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA
# H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA B200",
# "Tesla V100-SXM2-32GB": case-insensitive, on whole words (so "GH200" is not an "H200" and
# "GB200", whose figure differs, is not a "B200"); the first pattern that matches wins, so the
# NVL and PCIe boards come before their SXM sibling.
_SXM_HOPPER = {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}
_NVL_HOPPER = {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}
KNOWN_PEAKS_TFLOPS: Tuple[Tuple[str, Dict[str, float]], ...] = (
    (r"\bH100\b.*\bNVL\b", _NVL_HOPPER),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"\bH100\b", _SXM_HOPPER),          # SXM5 ("H100 80GB HBM3", "H100 SXM5 ...")
    (r"\bH200\b.*\bNVL\b", _NVL_HOPPER),
    (r"\bH200\b", _SXM_HOPPER),          # SXM
    (r"\bGH200\b", _SXM_HOPPER),
    (r"\bB200\b", {"bf16": 2250.0, "tf32": 1125.0, "fp32": 75.0}),
    (r"\bA100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),   # 40/80 GB, SXM4 and PCIe alike
    (r"\bV100\b.*\bPCIe\b", {"bf16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", {"bf16": 125.0, "fp32": 15.7}),                  # SXM2
)
# The bf16 column alone, as before (the figure MFU uses for a bf16 run).
KNOWN_PEAK_TFLOPS: Tuple[Tuple[str, float], ...] = tuple((p, f["bf16"]) for p, f in KNOWN_PEAKS_TFLOPS)


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


def known_peak_tflops(device_name: str, kind: str = "bf16") -> Optional[float]:
    """The data-sheet dense TFLOP/s of a GPU named as torch names it, for ``kind`` ('bf16',
    'tf32', 'fp32'); None for an unknown GPU or a kind the GPU lacks (TF32 before Ampere)."""
    for pattern, figures in KNOWN_PEAKS_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return figures.get(kind)
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


def gpu_peak_kind(dtype: torch.dtype) -> str:
    """Which data-sheet column an MFU in ``dtype`` divides by on a GPU: an fp32 run whose
    matmuls may use TF32 ('high'/'medium' float32 matmul precision) is measured against TF32."""
    if dtype == torch.float32:
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
    return "bf16"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                         size: Optional[int] = None, seconds: Optional[float] = None) -> float:
    """Best observed FLOP/s of a square ``dtype`` matmul on ``device`` with torch's current
    thread count: what this device actually sustains on the op that dominates a ViT, a fair (if
    slightly generous to us, since it is below the datasheet) ceiling where no datasheet figure
    is known, e.g. a CPU."""
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


def peak_flops(device: torch.device, override_tflops: Optional[float] = None,
               dtype: torch.dtype = torch.bfloat16) -> Tuple[float, str]:
    """(peak FLOP/s per device for a run computing in ``dtype``, where the figure came from).

    An explicit figure wins; then the data-sheet column for ``dtype`` of a known GPU (bf16; for
    fp32, TF32 or plain fp32 as torch's float32 matmul precision allows); then a ``dtype``
    matmul measured now with torch's current thread count (CPUs, unknown GPUs): call it after
    the rank's thread budget is applied, so the peak is the one those threads can reach.

    bf16 on a CPU without native bf16 (fastdeit.precision.cpu_bf16) is computed on the fp32
    units after a conversion, so its ceiling is the fp32 one, and the fp32 matmul is measured.
    A bf16 matmul is no ceiling there: torch's fallback GEMM is slowest on the large square
    shape (0.56 GFLOP/s at 1024 with oneDNN capped at AVX2, against 3 GFLOP/s reached by the
    demo teacher's smaller convolutions, an MFU of 557%); against fp32 the same run reads 2.6%,
    which is what emulated bf16 makes of the machine.
    """
    device = torch.device(device)
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops: peak TFLOP/s must be positive, got {override_tflops}")
        return override_tflops * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = gpu_peak_kind(dtype)
        tflops = known_peak_tflops(name, kind)
        if tflops is not None:
            return tflops * 1e12, f"datasheet ({name}, dense {kind})"
    threads = f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}" \
        if device.type == "cpu" else ""
    if device.type == "cpu" and dtype == torch.bfloat16:
        from fastdeit.precision import cpu_bf16

        support = cpu_bf16()
        if not support.native:
            return (measure_matmul_flops(device, torch.float32),
                    f"measured (fp32 matmul{threads}: this CPU {support.reason}, so bf16 runs on its fp32 units)")
    return measure_matmul_flops(device, dtype), f"measured ({dtype_name(dtype)} matmul{threads})"
