"""The compute dtype of a run: ``engine.precision`` / ``teacher.dtype`` resolved against the
hardware in front of it.

``auto`` (the default) means bf16 where the device computes bf16 natively and fp32 elsewhere:

* CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and newer). Older
  GPUs emulate bf16 through fp32 units; the default ``including_emulation=True`` says yes there.
* CPU: bf16 instructions the matmul library will actually use. Two things must hold:
  1. the CPU has them: ``avx512_bf16`` or ``amx_bf16`` among the x86 flags (``bf16`` among an
     Arm CPU's features), read from ``/proc/cpuinfo`` (torch's cpuinfo as a fallback); and
  2. oneDNN, which runs every bf16 matmul and convolution on CPU, is allowed to use them:
     ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) can cap it below, and then torch falls
     back to a scalar bf16 GEMM. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone is no
     guide: it is True on any AVX-512 CPU, where oneDNN converts bf16 to fp32 in registers.
  Measured on a Sapphire Rapids core (1 thread, 512x512 matmul, GFLOP/s fp32 / bf16): AMX
  175 / 1175; oneDNN capped at AVX512_CORE_BF16 174 / 105; at AVX512_CORE 177 / 35; at AVX2
  (ONEDNN_MAX_CPU_ISA=AVX2, what an AMD EPYC without avx512_bf16 runs) 175 / 2.1.
  ``ATEN_CPU_CAPABILITY`` does not matter here: it picks ATen's own vector kernels
  (elementwise, norms), not the matmul path (AVX2 there left the bf16 matmul at 1187).

An explicit ``bf16`` where it is not native still runs, and warns once with the cost measured
on the spot (a bf16 against an fp32 matmul on the rank's threads).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Set

import torch

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN's CPU ISA names in ascending order (oneDNN's dnnl_cpu_isa_t and its ONEDNN_MAX_CPU_ISA
# values); bf16 instructions start at AVX512_CORE_BF16. AVX2_VNNI_2 only converts to bf16.
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
               "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512",
               "AVX10_2_512_AMX_2", "DEFAULT", "ALL")
ONEDNN_FIRST_BF16 = ONEDNN_ISAS.index("AVX512_CORE_BF16")


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    reason: str             # completes "this device ..." / "this CPU ...", e.g. "has AMX (amx_bf16)"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the name ('bf16'/'fp32'), its torch dtype and why."""

    name: str
    why: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[Set[str]]:
    """The first processor's x86 ``flags`` (or Arm ``Features``), None where unreadable."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def onednn_isa_cap(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The ISA oneDNN is capped at by ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA, upper-cased; None if unset."""
    value = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def cpu_bf16(flags: Optional[Iterable[str]] = None, env: Mapping[str, str] = os.environ,
             machine: Optional[str] = None) -> Bf16Support:
    """Whether bf16 matmuls run on native instructions on this CPU (see the module docstring)."""
    machine = (machine or platform.machine()).lower()
    flags = set(flags) if flags is not None else cpu_flags()
    if machine in ("aarch64", "arm64"):
        if flags is not None and "bf16" in flags:
            return Bf16Support(True, "has bf16 instructions (Arm bf16)")
        return Bf16Support(False, "has no native bf16 (no Arm bf16 feature)")
    if flags is None:       # no /proc/cpuinfo (not Linux): torch's own cpuinfo
        flags = set()
        if torch.cpu._is_avx512_bf16_supported():
            flags.add("avx512_bf16")
        if torch.cpu._is_amx_tile_supported():
            flags.add("amx_bf16")
    have = [f for f in X86_BF16_FLAGS if f in flags]
    if not have:
        return Bf16Support(False, "has no native bf16 (no avx512_bf16 or amx_bf16)")
    cap = onednn_isa_cap(env)
    if cap is not None and cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) < ONEDNN_FIRST_BF16:
        return Bf16Support(False, f"has {', '.join(have)} but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from "
                                  "using them")
    if "amx_bf16" in have and cap is not None and cap in ONEDNN_ISAS and \
            ONEDNN_ISAS.index(cap) < ONEDNN_ISAS.index("AVX10_1_512_AMX"):
        return Bf16Support(True, f"has avx512_bf16 (AMX capped by ONEDNN_MAX_CPU_ISA={cap})")
    return Bf16Support(True, "has AMX (amx_bf16)" if "amx_bf16" in have else "has avx512_bf16")


def cuda_bf16(device: torch.device) -> Bf16Support:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Bf16Support(True, f"({name}) computes bf16 natively")
    return Bf16Support(False, f"({name}) has no native bf16 (before Ampere: bf16 would be emulated)")


def bf16_support(device: torch.device) -> Bf16Support:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16(device)
    if device.type == "cpu":
        return cpu_bf16()
    return Bf16Support(False, f"({device.type}) is not known to compute bf16 natively")


def _where(device: torch.device) -> str:
    return "this CPU" if torch.device(device).type == "cpu" else "this GPU"


def resolve(requested: str, device: torch.device, key: str = "engine.precision",
            support: Optional[Bf16Support] = None) -> Precision:
    """``requested`` ('auto', 'bf16', 'fp32') as the precision to run on ``device``.

    ``support`` (tests, a resumed run's caller) replaces the hardware probe.
    """
    from fastdeit.errors import ConfigError

    if requested not in PRECISIONS:
        raise ConfigError(f"{key}: {requested!r} is not one of {list(PRECISIONS)}")
    if requested != "auto":
        return Precision(requested, "set in the config")
    support = support or bf16_support(device)
    where = _where(device)
    if support.native:
        return Precision("bf16", f"auto: {where} {support.reason}")
    return Precision("fp32", f"auto: {where} {support.reason}")


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int = 512, seconds: float = 0.15) -> float:
    """Best FLOP/s of an n x n ``dtype`` matmul on ``device`` within about ``seconds``."""
    from fastdeit.flops import measure_matmul_flops

    return measure_matmul_flops(device, dtype, size=n, seconds=seconds)


_warned: Set[str] = set()


def emulated_bf16_warning(device: torch.device, keys: Iterable[str],
                          support: Optional[Bf16Support] = None) -> Optional[str]:
    """The one warning for an explicit bf16 on a device without native bf16 (None when bf16 is
    native, or when this process already warned): names the keys and the cost measured here."""
    device = torch.device(device)
    support = support or bf16_support(device)
    keys = list(keys)
    if support.native or not keys or "bf16-emulated" in _warned:
        return None
    _warned.add("bf16-emulated")
    bf16 = matmul_rate(torch.bfloat16, device)
    fp32 = matmul_rate(torch.float32, device)
    return (f"warning: {' and '.join(f'{k}=bf16' for k in keys)} on {_where(device)}, which "
            f"{support.reason}: bf16 is emulated, a bf16 matmul runs at {bf16 / 1e9:.3g} GFLOP/s here "
            f"against {fp32 / 1e9:.3g} in fp32 ({fp32 / max(bf16, 1.0):.0f}x slower); "
            "fp32 is the fast choice on this device")


def for_run(requested: str, device: torch.device, recorded: Optional[str] = None, key: str = "engine.precision",
            support: Optional[Bf16Support] = None) -> Precision:
    """The precision of a run that may resume a checkpoint written in ``recorded`` ('bf16',
    'fp32', None for a fresh run or a checkpoint from before precisions were recorded).

    A resumed run keeps its checkpoint's precision: DeepSpeed resumes a ZeRO checkpoint only in
    the precision it was written in (a bf16 run's optimizer shards are ``bf16_zero_pp_rank_*``
    files, an fp32 run's ``zero_pp_rank_*``; the other engine looks for files that are not
    there). ``auto`` therefore keeps it: an fp32 run resumed on a bf16 host stays fp32, a bf16
    run requeued on a host without native bf16 stays bf16, and the start-up warning gives its
    measured cost. An explicit setting that differs is a one-line error.
    """
    if recorded is None:
        return resolve(requested, device, key, support)
    from fastdeit.errors import CheckpointMismatchError

    if recorded not in DTYPES:
        raise CheckpointMismatchError(f"the checkpoint records {key}={recorded!r}, not one of {list(DTYPES)}")
    if requested not in ("auto", recorded):
        resolve(requested, device, key, support)          # a bad value is reported as such first
        raise CheckpointMismatchError(
            f"{key}={requested} but the checkpoint to resume was written in {recorded}, and DeepSpeed resumes "
            f"it only in {recorded}: set {key}={recorded} (or auto), or start a new run in another trainer.run_dir")
    if requested == recorded:
        return Precision(recorded, "set in the config")
    if recorded == "fp32":
        return Precision("fp32", "auto: kept from the checkpoint, written in fp32")
    support = support or bf16_support(device)
    if support.native:
        return Precision("bf16", "auto: kept from the checkpoint, written in bf16")
    return Precision("bf16", f"auto: kept from the checkpoint, written in bf16, which DeepSpeed resumes only in "
                             f"bf16, although {_where(device)} {support.reason}")
