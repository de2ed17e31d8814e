"""The harness every benchmark runs on: its settings (``RunSettings``, ``Rounds``), the
single-process DeepSpeed world (``world_of_one``), interleaved rounds (``Interleaved``), step
clocks, statistics, peak memory and FLOP/s, the run record, JSON and markdown writers, the
README splice and the images/sec bar chart.

Timing rules (the same in every benchmark):
* on GPU, CUDA events recorded on the current stream at phase boundaries, read after one
  synchronize at the end of a round, so timing itself adds no host sync to the step;
* on CPU, ``time.perf_counter`` (CPU kernels run synchronously on the calling thread);
* warm-up steps are never timed; figures are medians over the timed steps, with the
  25th/75th percentiles to show the noise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- settings


def opt(default: Any = None, help: Optional[str] = None, **argparse_kw: Any) -> Any:
    """A settings field with its command-line help and argparse keywords (``add_fields``)."""
    meta = {"help": help, **argparse_kw} if help else dict(argparse_kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def add_fields(p: argparse.ArgumentParser, cls: type, defaults: Optional[Dict[str, Any]] = None,
               help: Optional[Dict[str, str]] = None) -> None:
    """One ``--flag`` per field of the settings dataclass ``cls``, so an option is declared once,
    with its default: a bool is a switch, ``List[T]`` takes one or more values, a dict is a JSON
    string; the field's metadata adds argparse keywords (help, choices, nargs, const).
    ``defaults`` / ``help`` override them per field for one CLI."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:          # Optional[T]
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        kw: Dict[str, Any] = dict(f.metadata)
        if defaults and f.name in defaults:
            kw["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        else:
            kw["required"] = True
        if help and f.name in help:
            kw["help"] = help[f.name]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = "store_true"
        elif origin is list:
            kw.update(type=typing.get_args(tp)[0], nargs=kw.get("nargs", "+"))
        elif origin is dict:
            kw["type"] = json.loads
        else:
            kw["type"] = tp
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    """The settings dataclass ``cls`` from a namespace parsed with ``add_fields``."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


@dataclass
class RunSettings:
    """Where a benchmark runs and what it writes (the options every benchmark CLI shares)."""

    peak_tflops: Optional[float] = field(default=None, metadata={
        "help": "MFU denominator per device; default: as training runs (data sheet, else measured)"})
    device: str = "auto"
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch intra-op threads (default: torch's choice); on a shared CPU host one thread per "
                "free core avoids OpenMP threads waiting on a descheduled peer"})
    out: str = field(default=str(RESULTS), metadata={"help": "directory for the JSON / markdown / PNG record"})
    name: Optional[str] = field(default=None, metadata={"help": "suffix of the record's file name"})
    readme: Optional[str] = field(default=None, metadata={"help": "also splice the table into this markdown file"})


@dataclass
class Rounds:
    """How the items of a run are timed: ``warmup`` untimed steps each after building it, then
    ``rounds`` rounds over all of them, each ``rewarm`` untimed + ``steps`` timed steps."""

    warmup: int = field(default=3, metadata={"help": "untimed steps per variant before the rounds"})
    steps: int = field(default=10, metadata={"help": "timed steps per variant per round"})
    rounds: int = field(default=3, metadata={"help": "interleaved rounds over all variants"})
    rewarm: int = field(default=1, metadata={"help": "untimed steps per variant at the start of each round"})


@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """The single-process distributed world DeepSpeed engines need, for the ``with`` block: made
    here (whatever RANK/WORLD_SIZE a launcher set) and torn down on exit, unless
    the process already has one."""
    import torch.distributed as dist

    from fastdeit import distributed

    if dist.is_available() and dist.is_initialized():
        yield
        return
    # No port chosen here: distributed.init gives a lone process a free one (distributed.free_port).
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)         # a benchmark is one process, whatever launched it
    distributed.init(distributed.env_from(os.environ))
    try:
        yield
    finally:
        distributed.teardown()


# --------------------------------------------------------------------------- device and clocks


def pick_device(name: str) -> torch.device:
    """'auto' -> the device the trainer would use here (fastdeit.distributed.device_for: DeepSpeed's
    accelerator, this local rank's GPU); an explicit name must be usable."""
    from fastdeit import distributed

    if name == "auto":
        return distributed.device_for(distributed.env_from(os.environ))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Time marks within steps: CUDA events on GPU (no sync when marking), perf_counter on CPU.

    ``mark()`` returns an opaque handle; ``elapsed_ms(a, b)`` is valid after ``synchronize``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def synchronize(self) -> None:
        synchronize(self.device)


def summarize(values_ms: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, mean and best (ms) of timed steps. The median is the headline; the
    best is what a step costs when nothing else competes for the host, since contention
    only ever adds time (a useful cross-check on a shared machine)."""
    if not values_ms:
        raise ValueError("no timed steps")
    ordered = sorted(values_ms)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2],
            "mean": statistics.fmean(ordered), "min": ordered[0], "n": len(ordered)}


# --------------------------------------------------------------------------- peak FLOP/s


class PeakFlops:
    """The MFU denominator, by the rule training runs use (``fastdeit.flops.peak_flops``):
    ``--peak-tflops`` if given; else the data-sheet figure of a known GPU for the benchmark's
    compute dtype (dense bf16; TF32 or fp32 for fp32); else a matmul in that dtype measured with
    the threads the benchmark runs on (on a CPU without native bf16, the fp32 units' rate).

    Measured more than once (``sample()`` between rounds) and the maximum kept: a peak is a
    maximum, and on a shared or throttled host one short measurement can land in a slow patch.
    """

    def __init__(self, device: torch.device, given_tflops: Optional[float] = None,
                 dtype: torch.dtype = torch.bfloat16):
        from fastdeit import flops

        self.device = device
        self.dtype = dtype
        self.given = given_tflops is not None
        self.flops = given_tflops * 1e12 if self.given else 0.0
        self.samples: List[float] = []
        self.datasheet_tflops = None
        self.measured_as = ""
        if device.type == "cuda":
            self.gpu_name = torch.cuda.get_device_name(device)
            self.kind = flops.gpu_peak_kind(dtype)
            self.datasheet_tflops = flops.known_peak_tflops(self.gpu_name, self.kind)
            if self.datasheet_tflops is not None and not self.given:
                self.flops = self.datasheet_tflops * 1e12
        self.sample()

    def sample(self) -> None:
        if self.given or self.datasheet_tflops is not None:
            return
        from fastdeit.flops import peak_flops

        value, self.measured_as = peak_flops(self.device, None, self.dtype)
        self.samples.append(value)
        self.flops = max(self.samples)

    @property
    def source(self) -> str:
        if self.given:
            return "given"
        if self.datasheet_tflops is not None:
            return f"datasheet ({self.gpu_name}, dense {self.kind})"
        return f"best of {len(self.samples)} {self.measured_as}"

    def record(self) -> Dict[str, Any]:
        from fastdeit.flops import dtype_name

        return {"tflops": self.flops / 1e12, "source": self.source, "dtype": dtype_name(self.dtype),
                "datasheet_tflops": self.datasheet_tflops,
                "samples_tflops": [round(x / 1e12, 4) for x in self.samples]}


# --------------------------------------------------------------------------- peak memory


class MemoryProbe:
    """Peak device memory of one variant while several variants share the device.

    Each variant's own peak = its resident state (parameters, gradients, optimizer state, kept
    after warm-up) + the largest transient rise above the resting total during its own steps.
    Other variants' resident state is constant meanwhile, so it cancels. CUDA only: PyTorch
    keeps no peak statistics for CPU memory, and process RSS mixes variants and the C
    allocator's caching, so on CPU the figure is reported as unknown (None).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._peak_allocated = 0     # whole run, all variants together (CUDA)
        self._peak_reserved = 0

    def allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def start(self) -> Optional[int]:
        if not self.cuda:
            return None
        synchronize(self.device)
        self._note_run_peak()          # before the reset forgets the peak so far
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def transient(self, start: Optional[int]) -> Optional[int]:
        if not self.cuda or start is None:
            return None
        synchronize(self.device)
        self._note_run_peak()
        return torch.cuda.max_memory_allocated(self.device) - start

    def _note_run_peak(self) -> None:
        self._peak_allocated = max(self._peak_allocated, torch.cuda.max_memory_allocated(self.device))
        self._peak_reserved = max(self._peak_reserved, torch.cuda.max_memory_reserved(self.device))

    def run_peak(self) -> Dict[str, Any]:
        """The run's peak memory, every variant included: on CUDA the caching allocator's peak
        allocated and reserved bytes on the device; on CPU the process's maximum resident set
        (what the OS saw, including Python, the libraries and the allocator's caches)."""
        if self.cuda:
            synchronize(self.device)
            self._note_run_peak()
            return {"kind": "device", "allocated_gib": self._peak_allocated / 2**30,
                    "reserved_gib": self._peak_reserved / 2**30}
        return {"kind": "process max RSS", "rss_gib": max_rss_bytes() / 2**30}


class Interleaved:
    """Items (variants, pipelines) built one by one, then timed in rounds that rotate their
    order, so drifting clocks and noisy neighbours hit all of them alike. Per item (by
    ``.name``): its resident memory after warm-up and the largest transient rise above the
    resting total during its own windows (MemoryProbe; None on CPU)."""

    def __init__(self, device: torch.device, log: Callable[..., None] = None):
        self.probe = MemoryProbe(device)
        self.log = log or print_flush
        self.built: List[Any] = []
        self.memory: Dict[str, Dict[str, Any]] = {}

    def build(self, factory: Callable[[], Any], warm: Callable[[Any], None]) -> Any:
        """``factory()`` (seeded alike for every item), then ``warm(item)`` untimed."""
        before = self.probe.allocated()
        torch.manual_seed(0)
        item = factory()
        self.built.append(item)
        warm(item)                            # allocator, kernels, DeepSpeed buffers, loader start-up
        after = self.probe.allocated()
        self.memory[item.name] = {"resident": after - before if before is not None else None, "transient": 0}
        return item

    def run(self, rounds: int, window: Callable[[Any], None], peak: "PeakFlops",
            on_round: Optional[Callable[[int], None]] = None) -> None:
        """``rounds`` rounds of ``window(item)`` over every item; ``on_round(rounds_done)``
        after each, so a run stopped from outside keeps what it measured."""
        for r in range(rounds):
            k = r % len(self.built)
            for item in self.built[k:] + self.built[:k]:     # rotate: no item always goes first
                start = self.probe.start()
                window(item)
                transient = self.probe.transient(start)
                if transient is not None:
                    mem = self.memory[item.name]
                    mem["transient"] = max(mem["transient"], transient)
            peak.sample()
            self.log(f"  round {r + 1}/{rounds} done")
            if on_round is not None:
                on_round(r + 1)

    def peak_mem_gib(self, name: str) -> Optional[float]:
        mem = self.memory[name]
        return (mem["resident"] + mem["transient"]) / 2**30 if mem["resident"] is not None else None


def max_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_md(peak: Dict[str, Any]) -> str:
    """One line for a record: the run's peak memory (MemoryProbe.run_peak)."""
    if peak["kind"] == "device":
        return (f"peak memory (whole run, device): {peak['allocated_gib']:,.2f} GiB allocated, "
                f"{peak['reserved_gib']:,.2f} GiB reserved by PyTorch's caching allocator")
    return (f"peak memory (whole run, CPU): process max RSS {peak['rss_gib']:,.2f} GiB "
            "(all variants together; per variant n/a on CPU)")


# --------------------------------------------------------------------------- the record


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> Optional[str]:
    """This checkout's commit, short (None outside a git checkout)."""
    return _git("rev-parse", "--short=12", "HEAD")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> Dict[str, Any]:
    hw: Dict[str, Any] = {"device": device.type, "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "host": socket.gethostname()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                  gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return hw


def hardware_tag(device: torch.device) -> str:
    """Short name for result files: 'cpu', 'h200', 'a100-sxm4-80gb', ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def software() -> Dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("timm", "deepspeed", "nvidia.dali", "torchvision"):
        try:
            versions[module.split(".")[-1]] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # not installed, or broken: the record says so
            versions[module.split(".")[-1]] = "unavailable"
    return versions


def base_record(benchmark: str, device: torch.device, argv: Sequence[str]) -> Dict[str, Any]:
    now = _dt.datetime.now()
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "benchmark": benchmark,
        "date": now.date().isoformat(),
        "time": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "dirty": bool(dirty) if dirty is not None else None,
        "command": " ".join(["python", "-m", f"benchmarks.{benchmark}", *map(shlex.quote, argv)]),
        "hardware": hardware(device),
        "software": software(),
    }


def result_stem(record: Dict[str, Any], device: torch.device, name: Optional[str]) -> str:
    """``YYYY-MM-DD-<hardware>-<benchmark>[-<name>]``: dated records that sort by date."""
    stem = f"{record['date']}-{hardware_tag(device)}-{record['benchmark']}"
    return f"{stem}-{name}" if name else stem


# --------------------------------------------------------------------------- tables


def model_label(name: str, kwargs: Any = None) -> str:
    """'deit_tiny' or 'deit_tiny (depth=1, embed_dim=96)' when timm kwargs resize the model."""
    name = name.replace("_patch16_224", "")
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs else None
    return f"{name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else name


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """``align``: one of 'l'/'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def record_header_md(record: Dict[str, Any], title: str) -> str:
    hw = record["hardware"]
    where = hw.get("gpu") or f"{hw['cpu']} ({hw['cpu_cores']} cores, {plural(hw['torch_threads'], 'torch thread')})"
    sw = record["software"]
    commit = f"`{record['commit']}`" + (" (uncommitted changes)" if record.get("dirty") else "")
    return "\n".join([
        f"### {title}",
        "",
        f"- date: {record['time']}",
        f"- commit: {commit}",
        f"- hardware: {where}",
        f"- software: torch {sw['torch']}, timm {sw['timm']}, deepspeed {sw['deepspeed']}, "
        f"DALI {sw['dali']}, python {sw['python']}",
        f"- command: `{record['command']}`",
    ])


# --------------------------------------------------------------------------- output files


def write_record(record: Dict[str, Any], markdown: str, out_dir: Path, stem: str) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    return paths


def update_readme(readme: Path, key: str, markdown: str) -> None:
    """Replace the text between ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->`` in ``readme``
    (appending the marked block if it is not there yet): the README shows the latest table."""
    readme = Path(readme)
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = readme.read_text() if readme.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    readme.write_text(text)


def bar_chart(labels: Sequence[str], values: Sequence[float], path: Path, title: str,
              xlabel: str = "images / second", highlight: Sequence[str] = (),
              notes: Sequence[str] = ()) -> Path:
    """Horizontal bars, one per variant, value printed at each bar's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * n + 1.6 + 0.25 * len(notes)))
    colours = ["#d95f02" if lab in highlight else "#7570b3" for lab in labels]
    y = list(range(n))[::-1]
    ax.barh(y, values, color=colours)
    ax.set_yticks(y, labels)
    top = max(values) if values else 1.0
    for yi, v in zip(y, values):
        ax.text(v + 0.01 * top, yi, f"{v:,.1f}", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    for i, note in enumerate(notes):
        fig.text(0.01, 0.01 + 0.03 * (len(notes) - 1 - i), note, fontsize=7, color="#444444")
    fig.tight_layout(rect=(0, 0.035 * len(notes), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def deit_train_transform(img_size: int):
    """The reference DeiT train transform, built the way the reference builds it: timm's
    create_transform with RandomResizedCrop (bicubic), flip, RandAugment rand-m9-mstd0.5-inc1,
    normalise and random erasing 0.25 'pixel' (color_jitter is passed but ignored under
    RandAugment, as in the reference).

    Pillow >= 11 raises on posterize with 0 bits, which timm's posterize ops ask for at the
    highest magnitude (m9 plus noise clipped at 10, about 0.15% of images), so a baseline epoch
    would crash; those ops get Pillow's old behaviour (a black image) instead, as
    benchmarks/data.py does and as fastdeit's own RandAugment does.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment, create_transform

    from fastdeit.data.config import IMAGENET_MEAN, IMAGENET_STD

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, bits_to_keep)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize
    return create_transform(
        input_size=img_size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
        color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        re_prob=0.25, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every engine it builds at INFO; benchmarks build several."""
    import logging

    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:
        pass


def print_flush(*args: Any) -> None:
    print(*args, flush=True)
    sys.stdout.flush()


def save_record(record: Dict[str, Any], markdown_text: str, chart_fn, args, device, kind: str) -> Dict[str, Any]:
    """Write a benchmark's JSON + markdown + bar chart under ``args.out`` (and its README table
    when ``args.readme`` is set); list the files in the record and print them."""
    stem = result_stem(record, device, args.name)
    paths = write_record(record, markdown_text, Path(args.out), stem)
    paths["png"] = chart_fn(record, Path(args.out) / f"{stem}.png")
    if args.readme:
        update_readme(Path(args.readme), kind, markdown_text)
    record["files"] = {k: str(v) for k, v in paths.items()}
    print_flush("wrote " + ", ".join(str(p) for p in paths.values()))
    return record


def write_partial(record: Dict[str, Any], device, args) -> Path:
    """The record so far, as JSON only, where the final one will go: a run stopped from outside
    (the GPU suite's per-stage cap) leaves what it measured. The finished run overwrites it."""
    path = Path(args.out) / f"{result_stem(record, device, args.name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)            # never a half-written file, whenever the kill comes
    return path


def start_run(kind: str, args: RunSettings, argv):
    """The device, the thread count and a fresh record (commit and time now) for a benchmark run."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = base_record(kind, device, argv)
    quiet_deepspeed()
    return device, record
