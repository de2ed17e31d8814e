"""engine.precision / teacher.dtype 'auto': bf16 only where the hardware computes it natively.

The decision is checked three ways: against CPU flag sets of the machine kinds this project
runs on, against what oneDNN really does on this host when its ISA is capped (a subprocess per
cap, with the bf16 and fp32 matmul rates measured there), and through the resume rules.
"""
import subprocess
import sys

import pytest
import torch

from fastdeit import flops, precision
from fastdeit.errors import CheckpointMismatchError
from fastdeit.precision import Bf16Support, cpu_bf16, for_run, resolve
from tests.childenv import child_env

# /proc/cpuinfo flags, abridged, of the CPUs named.
EPYC_ROME = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}                  # AMD Zen 2: no bf16
EPYC_GENOA = EPYC_ROME | {"avx512f", "avx512bw", "avx512_bf16"}             # AMD Zen 4
SKYLAKE = EPYC_ROME | {"avx512f", "avx512bw", "avx512_vnni"}                # AVX-512, no bf16
SAPPHIRE = SKYLAKE | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}    # Intel SPR: AMX

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,native", [(EPYC_ROME, False), (SKYLAKE, False), (EPYC_GENOA, True),
                                          (SAPPHIRE, True)])
def test_cpu_flags(flags, native):
    support = cpu_bf16(flags, env={}, machine="x86_64")
    assert support.native is native
    chosen = resolve("auto", CPU, support=support)
    assert chosen.name == ("bf16" if native else "fp32")
    assert chosen.why.startswith("auto: this CPU ")
    if not native:
        assert chosen.why == "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)"


def test_onednn_cap_is_honoured():
    # ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16: oneDNN will not use the bf16 instructions.
    for cap in ("AVX2", "avx2", "AVX512_CORE", "AVX512_CORE_VNNI"):
        assert not cpu_bf16(SAPPHIRE, env={"ONEDNN_MAX_CPU_ISA": cap}, machine="x86_64").native, cap
    assert not cpu_bf16(SAPPHIRE, env={"DNNL_MAX_CPU_ISA": "AVX2"}, machine="x86_64").native
    for cap in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", "DEFAULT"):
        assert cpu_bf16(SAPPHIRE, env={"ONEDNN_MAX_CPU_ISA": cap}, machine="x86_64").native, cap
    # ATEN_CPU_CAPABILITY picks ATen's vector kernels, not the matmul library: no effect.
    assert cpu_bf16(SAPPHIRE, env={"ATEN_CPU_CAPABILITY": "avx2"}, machine="x86_64").native
    assert cpu_bf16({"fp", "asimd", "bf16"}, env={}, machine="aarch64").native
    assert not cpu_bf16({"fp", "asimd"}, env={}, machine="aarch64").native


_PROBE = """
import json, torch
from fastdeit import flops, precision
from fastdeit.errors import CheckpointMismatchError
torch.set_num_threads(1)
rate = {n: flops.measure_matmul_flops(torch.device("cpu"), d, size=256, seconds=0.1)
        for n, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
print(json.dumps({"native": precision.cpu_bf16().native, **rate}))
"""


@pytest.mark.parametrize("cap", ["", "AVX2"])
def test_detection_matches_what_onednn_does_here(cap):
    """On this host, with oneDNN as it is and capped at AVX2 (an AMD EPYC without avx512_bf16,
    imitated): where auto says 'not native', a bf16 matmul really is several times slower
    than fp32; where it says native, it is not."""
    import json

    env = child_env(None)
    for key in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        env.pop(key, None)
    if cap:
        env.update(ONEDNN_MAX_CPU_ISA=cap, ATEN_CPU_CAPABILITY=cap.lower())
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["fp32"] / got["bf16"]
    if got["native"]:
        # AVX512_CORE_BF16 without AMX measured 0.6x fp32 on one core; emulation 5-85x slower.
        assert ratio < 2.5, got
    else:
        assert ratio > 3, got
    if cap == "AVX2":
        assert not got["native"]


def test_explicit_settings_and_bad_values():
    assert resolve("fp32", CPU) == precision.Precision("fp32", "set in the config")
    assert resolve("bf16", CPU, support=Bf16Support(False, "x")).name == "bf16"   # runs, warned about
    assert resolve("fp32", CPU).dtype == torch.float32 and resolve("bf16", CPU).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="engine.precision: 'fp16' is not one of"):
        resolve("fp16", CPU)


def test_resume_rules():
    native, emulated = Bf16Support(True, "has AMX (amx_bf16)"), Bf16Support(False, "has no native bf16 (...)")
    # A resumed run keeps its checkpoint's precision (DeepSpeed resumes it in no other)...
    assert for_run("auto", CPU, "fp32", support=native) == precision.Precision(
        "fp32", "auto: kept from the checkpoint, written in fp32")
    assert for_run("auto", CPU, "bf16", support=native).name == "bf16"
    # ...also where bf16 is emulated: it says so (and build.py warns with the measured cost).
    kept = for_run("auto", CPU, "bf16", support=emulated)
    assert kept.name == "bf16" and "DeepSpeed resumes only in bf16" in kept.why and "no native bf16" in kept.why
    assert for_run("fp32", CPU, "fp32", support=native).name == "fp32"
    # Fresh runs decide from the hardware; an explicit other precision is a one-line error.
    assert for_run("auto", CPU, None, support=emulated).name == "fp32"
    with pytest.raises(CheckpointMismatchError, match="engine.precision=fp32 but the checkpoint to resume was "
                                                      "written in bf16, and DeepSpeed resumes it only in bf16"):
        for_run("fp32", CPU, "bf16", support=emulated)
    with pytest.raises(CheckpointMismatchError, match="records engine.precision='fp16'"):
        for_run("auto", CPU, "fp16", support=native)


def test_emulated_bf16_warns_once_with_the_cost(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())
    rates = {torch.bfloat16: 2e9, torch.float32: 150e9}
    monkeypatch.setattr(precision, "matmul_rate", lambda dtype, device: rates[dtype])
    emulated = Bf16Support(False, "has no native bf16 (no avx512_bf16 or amx_bf16)")
    text = precision.emulated_bf16_warning(CPU, ["engine.precision", "teacher.dtype"], emulated)
    assert text == ("warning: engine.precision=bf16 and teacher.dtype=bf16 on this CPU, which has no native "
                    "bf16 (no avx512_bf16 or amx_bf16): bf16 is emulated, a bf16 matmul runs at 2 GFLOP/s here "
                    "against 150 in fp32 (75x slower); fp32 is the fast choice on this device")
    assert precision.emulated_bf16_warning(CPU, ["engine.precision"], emulated) is None       # once
    assert precision.emulated_bf16_warning(CPU, ["engine.precision"], Bf16Support(True, "")) is None


# --------------------------------------------------------------------------- the MFU peak


@pytest.mark.parametrize("name,kind,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 80GB HBM3", "fp32", 67.0), ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA H200 NVL", "fp32", 60.0),
    ("Tesla V100-SXM2-32GB", "tf32", None), ("Tesla V100-SXM2-32GB", "fp32", 15.7),
    ("NVIDIA B200", "tf32", 1125.0),
])
def test_datasheet_columns(name, kind, tflops):
    assert flops.known_peak_tflops(name, kind) == tflops


def test_gpu_fp32_column_follows_torch_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert flops.gpu_peak_kind(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert flops.gpu_peak_kind(torch.float32) == "tf32"
        assert flops.gpu_peak_kind(torch.bfloat16) == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_peak_is_measured_in_the_run_dtype_with_the_rank_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, source = flops.peak_flops(CPU, dtype=torch.float32)
        assert source == "measured (fp32 matmul, 1 thread)" and fp32 > 1e8
        bf16, source = flops.peak_flops(CPU, dtype=torch.bfloat16)
        if cpu_bf16().native:
            assert source == "measured (bf16 matmul, 1 thread)"
        else:   # emulated bf16 runs on the fp32 units: their peak is the ceiling
            assert source.startswith("measured (fp32 matmul, 1 thread: this CPU ")
    finally:
        torch.set_num_threads(threads)


def test_benchmarks_use_the_same_peak_rule():
    from benchmarks import common

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = common.PeakFlops(CPU, None, torch.float32)
        assert peak.source == "best of 1 measured (fp32 matmul, 1 thread)" and peak.flops > 1e8
        assert peak.record()["dtype"] == "fp32"
        assert common.PeakFlops(CPU, 2.0).source == "given"
    finally:
        torch.set_num_threads(threads)
