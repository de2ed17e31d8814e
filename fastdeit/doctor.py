"""Do torch, DALI and the NVIDIA driver agree? ``python -m fastdeit.doctor`` (run by ``make install``).

Prints the torch and DALI builds, whether the CPU computes bf16 natively (what
``engine.precision: auto`` picks on it) and, where ``nvidia-smi`` exists, the driver and the newest
CUDA it runs; exits 1 when nvidia-smi lists a GPU that torch cannot use (or that DALI's build
cannot), with the fix spelled out. Such a host otherwise trains on the CPU without a word and
skips every GPU test. The test suite asks ``gpu_unusable_reason()`` to fail its GPU tests there.

The rule behind the checks: a CUDA N.x build needs a driver whose ``nvidia-smi`` reports
"CUDA Version" N.y or newer (CUDA 13 needs R580+, CUDA 12 needs R525+); a newer driver runs
older builds. Nothing here initialises CUDA beyond ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

# `make install CUDA=12` installs torch from here and DALI's cuda120 build (Makefile).
CUDA12_TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
DRIVER_FOR_CUDA = {12: "R525", 13: "R580"}
DALI_BUILDS = {"nvidia-dali-cuda120": 12, "nvidia-dali-cuda130": 13}


@dataclass
class Driver:
    gpus: List[str]             # one name per GPU, as nvidia-smi lists them
    version: str                # e.g. "580.65.06"
    cuda: Optional[str]         # the newest CUDA this driver runs, e.g. "13.0" (nvidia-smi banner)

    @property
    def cuda_major(self) -> Optional[int]:
        return _major(self.cuda)


@dataclass
class Torch:
    version: str
    cuda: Optional[str]         # torch.version.cuda: None for a CPU-only build
    available: bool
    device_count: int
    warning: str = ""           # what torch said while looking for a GPU (e.g. "driver too old")


@dataclass
class Dali:
    version: Optional[str]      # None: not importable
    builds: List[str] = field(default_factory=list)   # installed nvidia-dali-cuda1x0 distributions


def _major(version: Optional[str]) -> Optional[int]:
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


Runner = Callable[[List[str]], Tuple[int, str]]


def _run(cmd: List[str]) -> Tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return 1, str(e)
    return proc.returncode, proc.stdout + proc.stderr


def query_driver(run: Optional[Runner] = None) -> Optional[Driver]:
    """The driver as nvidia-smi reports it; None where there is no nvidia-smi (no NVIDIA
    driver). A failing nvidia-smi (driver/library mismatch, no device) lists no GPU."""
    if run is None:
        if shutil.which("nvidia-smi") is None:
            return None
        run = _run
    code, listing = run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    rows = [line.rsplit(",", 1) for line in listing.splitlines() if "," in line] if code == 0 else []
    gpus = [name.strip() for name, _ in rows]
    version = rows[0][1].strip() if rows else ""
    code, banner = run(["nvidia-smi"])
    found = re.search(r"CUDA Version:\s*([0-9.]+)", banner) if code == 0 else None
    return Driver(gpus, version, found.group(1) if found else None)


def torch_state() -> Torch:
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = " ".join(str(w.message).strip() for w in caught if "CUDA" in str(w.message))
    return Torch(torch.__version__, torch.version.cuda, available,
                 torch.cuda.device_count() if available else 0, said)


def dali_state() -> Dali:
    from importlib import metadata

    builds = []
    for name in DALI_BUILDS:
        try:
            metadata.version(name)
            builds.append(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import nvidia.dali as dali
        version = dali.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        version = None
    return Dali(version, builds)


def hidden_by_env(env=None) -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1): torch is told to see no GPU, on purpose."""
    env = os.environ if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def diagnose(driver: Optional[Driver], torch: Torch, dali: Dali, env=None) -> Tuple[List[str], List[str]]:
    """(errors, notes). An error is a GPU that nvidia-smi lists and torch or DALI cannot use."""
    errors: List[str] = []
    notes: List[str] = []
    if len(dali.builds) > 1:
        errors.append(f"two DALI builds are installed ({', '.join(dali.builds)}), which share one "
                      f"`nvidia.dali` package. Fix: pip uninstall -y {' '.join(dali.builds)}, then "
                      "make install (or make install CUDA=12)")
    if driver is None:
        notes.append("no nvidia-smi: no NVIDIA driver on this host, so training and tests run on the CPU")
        return errors, notes
    if not driver.gpus:
        notes.append("nvidia-smi lists no GPU (or failed), so training and tests run on the CPU")
        return errors, notes
    gpus = f"{len(driver.gpus)} GPU{'s' if len(driver.gpus) > 1 else ''} ({driver.gpus[0]})"
    drv = f"driver {driver.version or '?'}, CUDA <= {driver.cuda or '?'}"
    fix_cuda12 = (f"make install CUDA=12 (torch from {CUDA12_TORCH_INDEX} and DALI's cuda120 build, "
                  f"for {DRIVER_FOR_CUDA[12]}+ drivers)")
    if not torch.available:
        if hidden_by_env(env):
            notes.append(f"nvidia-smi lists {gpus} but CUDA_VISIBLE_DEVICES hides them: CPU run by request")
        elif torch.cuda is None:
            errors.append(f"nvidia-smi lists {gpus}, {drv}, but torch {torch.version} is a CPU-only build. "
                          f"Fix: make install (CUDA 13 torch, needs an {DRIVER_FOR_CUDA[13]}+ driver) "
                          f"or {fix_cuda12}")
        elif driver.cuda_major is not None and _major(torch.cuda) > driver.cuda_major:
            errors.append(f"nvidia-smi lists {gpus}, {drv}, but torch {torch.version} is built for CUDA "
                          f"{torch.cuda}, which needs an {DRIVER_FOR_CUDA.get(_major(torch.cuda), 'newer')}+ "
                          f"driver: torch sees no GPU and training would run on the CPU. "
                          f"Fix: {fix_cuda12}, or upgrade the driver")
        else:
            errors.append(f"nvidia-smi lists {gpus}, {drv}, and torch {torch.version} (CUDA {torch.cuda}) "
                          f"should run on it, yet torch sees no GPU"
                          + (f" (torch says: {torch.warning})" if torch.warning else "")
                          + ". Check `python -c 'import torch; torch.cuda.init()'` for the reason "
                          "(a broken driver install, a container without GPU access)")
    dali_major = DALI_BUILDS.get(dali.builds[0]) if len(dali.builds) == 1 else None
    if dali_major is not None and driver.cuda_major is not None and dali_major > driver.cuda_major:
        errors.append(f"DALI's {dali.builds[0]} build needs a CUDA {dali_major} driver "
                      f"({DRIVER_FOR_CUDA[dali_major]}+) but this one ({drv}) runs CUDA "
                      f"{driver.cuda_major}: its GPU decoder would fail. Fix: make install DALI=cuda12")
    return errors, notes


def gpu_unusable_reason() -> Optional[str]:
    """Why the GPU that nvidia-smi lists cannot be used by torch here, or None (no GPU listed,
    torch sees it, or it is hidden on purpose). For tests/conftest.py: GPU tests fail then."""
    driver = query_driver()
    if driver is None or not driver.gpus:
        return None
    errors, _ = diagnose(driver, torch_state(), Dali(None))
    return errors[0] if errors else None


def cpu_line(support) -> str:
    """Whether this CPU computes bf16 natively, and what engine.precision=auto does about it
    (a fastdeit.precision.Bf16Support)."""
    if support.native:
        return f"CPU: native bf16 (this CPU {support.reason}): engine.precision=auto trains in bf16 on the CPU"
    return (f"CPU: no native bf16 (this CPU {support.reason}): engine.precision=auto trains in fp32 on the "
            "CPU (bf16 would be emulated, several times slower)")


def report(driver: Optional[Driver], torch: Torch, dali: Dali, env=None, cpu=None) -> Tuple[str, bool]:
    """(the text make install prints, ok). ``cpu``: the CPU's bf16 support, a line when given."""
    errors, notes = diagnose(driver, torch, dali, env)
    lines = [f"torch {torch.version}: " + (f"CUDA {torch.cuda} build" if torch.cuda else "CPU-only build")
             + (f", sees {torch.device_count} GPU{'s' if torch.device_count != 1 else ''}" if torch.available
                else ", sees no GPU"),
             "DALI " + (f"{dali.version} ({', '.join(dali.builds) or 'build unknown'})" if dali.version
                        else "not importable")]
    if driver is not None:
        names = ", ".join(sorted(set(driver.gpus))) or "no GPU listed"
        lines.append(f"NVIDIA driver {driver.version or '?'} (runs CUDA up to {driver.cuda or '?'}): "
                     f"{len(driver.gpus)} x {names}")
    if cpu is not None:
        lines.append(cpu_line(cpu))
    lines += [f"note: {n}" for n in notes]
    lines += [f"ERROR: {e}" for e in errors]
    return "\n".join(lines), not errors


def main(argv=None) -> int:
    from fastdeit.precision import cpu_bf16

    text, ok = report(query_driver(), torch_state(), dali_state(), cpu=cpu_bf16())
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
