"""torch, DALI and the driver: the install check (fastdeit.doctor) and the GPU tests' verdict,
with nvidia-smi's output and torch's state simulated both ways."""
import os
import subprocess
import sys
from pathlib import Path


from fastdeit import doctor
from fastdeit.doctor import Dali, Driver, Torch
from tests.childenv import child_env

ROOT = Path(__file__).resolve().parents[1]

SMI_LIST = "NVIDIA H200, 550.54.15\nNVIDIA H200, 550.54.15\n"
SMI_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def fake_runner(listing=SMI_LIST, banner=SMI_BANNER, code=0):
    def run(cmd):
        return code, (listing if "--query-gpu=name,driver_version" in cmd else banner)
    return run


CUDA12_DRIVER = Driver(["NVIDIA H200"] * 8, "550.54.15", "12.4")
CUDA13_DRIVER = Driver(["NVIDIA H200"] * 8, "580.65.06", "13.0")
TORCH_CU13_BLIND = Torch("2.11.0+cu130", "13.0", available=False, device_count=0)
TORCH_CU13_OK = Torch("2.11.0+cu130", "13.0", available=True, device_count=8)
TORCH_CU12_OK = Torch("2.11.0+cu126", "12.6", available=True, device_count=8)
DALI12 = Dali("2.4.0", ["nvidia-dali-cuda120"])


def test_nvidia_smi_is_parsed():
    driver = doctor.query_driver(fake_runner())
    assert driver == Driver(["NVIDIA H200", "NVIDIA H200"], "550.54.15", "12.4")
    assert driver.cuda_major == 12
    # nvidia-smi that fails (driver/library mismatch) lists no GPU: nothing to use, nothing to blame.
    assert doctor.query_driver(fake_runner(code=9)).gpus == []


def test_cuda13_torch_on_a_cuda12_driver_is_an_error_with_the_fix():
    text, ok = doctor.report(CUDA12_DRIVER, TORCH_CU13_BLIND, DALI12, env={})
    assert not ok
    assert "ERROR: nvidia-smi lists 8 GPUs (NVIDIA H200), driver 550.54.15, CUDA <= 12.4" in text
    assert "built for CUDA 13.0, which needs an R580+ driver" in text
    assert "make install CUDA=12" in text and doctor.CUDA12_TORCH_INDEX in text
    # What make install prints in any case: the builds and the driver.
    assert "torch 2.11.0+cu130: CUDA 13.0 build, sees no GPU" in text
    assert "NVIDIA driver 550.54.15 (runs CUDA up to 12.4): 8 x NVIDIA H200" in text


def test_agreeing_installs_pass():
    for driver, torch_ in ((CUDA13_DRIVER, TORCH_CU13_OK), (CUDA12_DRIVER, TORCH_CU12_OK),
                           (CUDA13_DRIVER, TORCH_CU12_OK)):             # a newer driver runs older builds
        text, ok = doctor.report(driver, torch_, DALI12, env={})
        assert ok and "ERROR" not in text, text
        assert "sees 8 GPUs" in text


def test_cpu_hosts_and_hidden_gpus_are_fine():
    text, ok = doctor.report(None, TORCH_CU13_BLIND, DALI12, env={})
    assert ok and "no nvidia-smi" in text
    text, ok = doctor.report(CUDA13_DRIVER, TORCH_CU13_BLIND, DALI12, env={"CUDA_VISIBLE_DEVICES": ""})
    assert ok and "CUDA_VISIBLE_DEVICES hides them" in text


def test_other_mismatches():
    cpu_torch = Torch("2.11.0+cpu", None, available=False, device_count=0)
    text, ok = doctor.report(CUDA13_DRIVER, cpu_torch, DALI12, env={})
    assert not ok and "CPU-only build" in text and "make install CUDA=12" in text
    # Same major, still blind: torch's own words are passed on.
    said = Torch("2.11.0+cu126", "12.6", False, 0, warning="CUDA initialization: no device")
    text, ok = doctor.report(CUDA12_DRIVER, said, DALI12, env={})
    assert not ok and "torch says: CUDA initialization: no device" in text
    # DALI's CUDA 13 build on a CUDA 12 driver: its GPU decoder could not run.
    text, ok = doctor.report(CUDA12_DRIVER, TORCH_CU12_OK, Dali("2.4.0", ["nvidia-dali-cuda130"]), env={})
    assert not ok and "make install DALI=cuda12" in text
    # Both DALI builds in one environment overwrite each other's nvidia.dali.
    text, ok = doctor.report(None, TORCH_CU13_BLIND, Dali("2.4.0", list(doctor.DALI_BUILDS)), env={})
    assert not ok and "two DALI builds" in text


def test_this_host():
    """The real check on this machine runs and agrees with what torch says."""
    import torch

    proc = subprocess.run([sys.executable, "-m", "fastdeit.doctor"], cwd=ROOT, capture_output=True, text=True,
                          env=child_env(None), timeout=300)
    assert f"torch {torch.__version__}" in proc.stdout and "DALI" in proc.stdout
    assert proc.returncode == (1 if "ERROR" in proc.stdout else 0)
    from fastdeit.precision import cpu_bf16

    native = cpu_bf16().native
    assert ("CPU: native bf16 (this CPU has " if native else "CPU: no native bf16 (this CPU has") in proc.stdout
    assert f"engine.precision=auto trains in {'bf16' if native else 'fp32'} on the CPU" in proc.stdout
    # An AMD EPYC without avx512_bf16, imitated: oneDNN capped at AVX2.
    proc = subprocess.run([sys.executable, "-m", "fastdeit.doctor"], cwd=ROOT, capture_output=True, text=True,
                          env=child_env(None, ONEDNN_MAX_CPU_ISA="AVX2"), timeout=300)
    assert "CPU: no native bf16" in proc.stdout and "trains in fp32 on the CPU" in proc.stdout


# The conftest's verdict on GPU tests, run in a child pytest with a fake nvidia-smi on PATH and
# torch told it has no GPU (so this also holds on a GPU host).
PROBE = """\
import pytest, torch

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu():
    pass

def test_on_cpu():
    pass
"""
NO_CUDA_PLUGIN = "import torch\ntorch.cuda.is_available = lambda: False\n"


def run_probe(tmp_path, smi: bool, extra_env=None):
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "no_cuda.py").write_text(NO_CUDA_PLUGIN)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    path = os.environ["PATH"]
    if smi:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        fake = bin_dir / "nvidia-smi"
        listing = SMI_LIST.replace("\n", "\\n")
        fake.write_text("#!/bin/sh\n"
                        f"case \"$*\" in *--query-gpu*) printf '{listing}'; exit 0;; esac\n"
                        f"cat <<'EOF'\n{SMI_BANNER}EOF\n")
        fake.chmod(0o755)
        path = f"{bin_dir}:{path}"
    env = child_env(None, path_first=[str(tmp_path)], PATH=path, **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no_cuda", "-p", "tests.conftest",
                           "-p", "no:cacheprovider", "test_probe.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_gpu_tests_fail_where_nvidia_smi_lists_an_unusable_gpu(tmp_path):
    code, out = run_probe(tmp_path, smi=True)
    assert code == 1 and "1 failed, 1 passed" in out, out
    assert "FAILED test_probe.py::test_on_gpu" in out and "needs an R580+ driver" in out


def test_gpu_tests_skip_without_a_gpu_or_when_hidden(tmp_path):
    code, out = run_probe(tmp_path, smi=False)
    assert code == 0 and "1 passed, 1 skipped" in out, out
    code, out = run_probe(tmp_path, smi=True, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert code == 0 and "1 passed, 1 skipped" in out, out
