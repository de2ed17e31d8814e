"""Inference throughput of DeiT against the convnets and ViTs of the DeiT paper, side by side in
one run, drawn as the paper's Figure 1 (images/sec against ImageNet top-1).

    python -m benchmarks.infer                                   # every model, GPU: batch up to 256
    python -m benchmarks.infer --quick                           # CPU: 5 models, batch 8, eager
    python -m benchmarks.infer --models deit_small resnet50 --compile both

The DeiT paper (Touvron et al., ICML 2021, arXiv 2012.12877) measures throughput "for the largest
possible batch size" in images/sec at inference, and plots it against ImageNet top-1 (Figure 1,
from its comparison table of convnets and transformers trained on ImageNet-1k only). Here, per
model (timm's architecture, random weights: throughput does not depend on them):

* the paper's input size (EfficientNet-B0..B7 at 224..600, the 384 models at 384);
* the largest batch that fits, halving from ``--batch-cap`` on CUDA out-of-memory; on the CPU the
  cap is the batch;
* the dtype by the trainer's rule (``fastdeit.precision``, ``auto``): bf16 where the device
  computes it natively, else fp32; the weights are cast to it (no autocast casts per forward);
* channels-last for the convnets, where cuDNN and oneDNN pick their faster NHWC kernels; the
  ViTs' only convolution is the patch embedding, so they stay contiguous (``--channels-last``);
* eager, compiled (``torch.compile``, default mode), or both (``--compile``);
* under ``torch.inference_mode``; warm-up iterations untimed (they include the compile and
  cuDNN's autotuning), then ``--seconds`` of timed iterations: on GPU CUDA events around each
  iteration, one synchronize at the end (benchmarks/common.py's PhaseClock), on CPU perf_counter.

Throughput is images/sec over the timed iterations; MFU is forward FLOPs (counted on the meta
device by fastdeit.flops) x images/sec over the peak of the compute dtype (common.PeakFlops).
The record holds each model's top-1 as the paper reports it, with its source (TOP1 below), and
the paper's V100 throughput, so that ratios between models can be compared with the paper's:
absolute figures depend on the device, ratios less so. Writes
results/<date>-<hardware>-infer[-<name>].{json,md,png}; the JSON is rewritten after each model
(``"partial": true``) so a run stopped from outside keeps what it measured.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks import common

PAPER = "DeiT paper (Touvron et al., arXiv 2012.12877 v2)"
TABLE = f"{PAPER}, Table 5 (throughput and ImageNet top-1 of convnets and transformers, ImageNet-1k only)"


@dataclass(frozen=True)
class Spec:
    """One model of the comparison: its timm name, where it sits in the figure, and the paper's
    figures for it (top-1 on ImageNet val, throughput on one 16 GB V100 with AMP)."""

    name: str              # timm architecture
    label: str             # as the paper names it
    family: str            # one line of the figure
    img_size: int          # the paper's input size
    top1: float            # ImageNet top-1 (%) as the paper reports it
    source: str            # where top1 comes from
    paper_img_s: float     # the paper's throughput (images/s, V100)
    conv: bool             # a convnet: channels-last helps


def _deit(name, label, family, size, top1, img_s, source=f"{TABLE}; also its Table 1 / Figure 1"):
    return Spec(name, label, family, size, top1, source, img_s, conv=False)


def _cnn(name, label, family, size, top1, img_s):
    return Spec(name, label, family, size, top1, TABLE, img_s, conv=True)


# The comparison of the paper's Table 5 / Figure 1, in the order they are measured (a run stopped
# by a time cap loses the last: the largest inputs). The ViT rows are the paper's ViT-B/16 and
# ViT-L/16 trained on ImageNet-1k only, at 384 px (Dosovitskiy et al.'s figures, as the DeiT
# paper quotes them); DeiT-B↑384 is DeiT-B fine-tuned at 384. EfficientNet top-1 figures are Tan &
# Le's (ICML 2019), as the DeiT paper quotes them, at their native resolutions. The figures were
# transcribed from Table 5 (top-1 of the DeiT rows also in docs/DESIGN.md); no copy of the paper
# is reachable from the machine this was written on to re-check the convnet rows against.
SPECS: List[Spec] = [
    _deit("deit_tiny_patch16_224", "DeiT-Ti", "DeiT", 224, 72.2, 2536.5),
    _deit("deit_small_patch16_224", "DeiT-S", "DeiT", 224, 79.8, 940.4),
    _deit("deit_base_patch16_224", "DeiT-B", "DeiT", 224, 81.8, 292.3),
    _deit("deit_tiny_distilled_patch16_224", "DeiT-Ti⚗", "DeiT⚗", 224, 74.5, 2529.5),
    _deit("deit_small_distilled_patch16_224", "DeiT-S⚗", "DeiT⚗", 224, 81.2, 936.2),
    _deit("deit_base_distilled_patch16_224", "DeiT-B⚗", "DeiT⚗", 224, 83.4, 290.9),
    _cnn("resnet50", "ResNet-50", "ResNet", 224, 76.2, 1226.1),
    _cnn("regnety_040", "RegNetY-4GF", "RegNetY", 224, 80.0, 1156.7),
    _cnn("regnety_080", "RegNetY-8GF", "RegNetY", 224, 81.7, 591.6),
    _cnn("regnety_160", "RegNetY-16GF", "RegNetY", 224, 82.9, 334.7),
    _cnn("efficientnet_b0", "EfficientNet-B0", "EfficientNet", 224, 77.1, 2694.3),
    _cnn("efficientnet_b1", "EfficientNet-B1", "EfficientNet", 240, 79.1, 1662.5),
    _cnn("efficientnet_b2", "EfficientNet-B2", "EfficientNet", 260, 80.1, 1255.7),
    _cnn("efficientnet_b3", "EfficientNet-B3", "EfficientNet", 300, 81.6, 732.1),
    _deit("deit_base_patch16_384", "DeiT-B↑384", "DeiT", 384, 83.1, 85.9),
    _deit("deit_base_distilled_patch16_384", "DeiT-B⚗↑384", "DeiT⚗", 384, 84.5, 85.8),
    _deit("vit_base_patch16_384", "ViT-B/16", "ViT", 384, 77.9, 85.9, source=TABLE),
    _deit("vit_large_patch16_384", "ViT-L/16", "ViT", 384, 76.5, 27.3, source=TABLE),
    _cnn("efficientnet_b4", "EfficientNet-B4", "EfficientNet", 380, 82.9, 349.4),
    _cnn("efficientnet_b5", "EfficientNet-B5", "EfficientNet", 456, 83.6, 169.1),
    _cnn("efficientnet_b6", "EfficientNet-B6", "EfficientNet", 528, 84.0, 96.9),
    _cnn("efficientnet_b7", "EfficientNet-B7", "EfficientNet", 600, 84.3, 55.1),
]
BY_NAME = {s.name: s for s in SPECS}
QUICK = ["deit_tiny_patch16_224", "deit_small_patch16_224", "resnet50", "regnety_040", "efficientnet_b0"]
# The yardstick of the ratio columns: the paper's best-known convnet baseline.
REFERENCE = "resnet50"


def select(patterns: Optional[Sequence[str]], quick: bool) -> List[Spec]:
    """The specs named by ``patterns`` (an exact timm name, else every name containing it), in
    SPECS order; ``--quick`` alone: the CPU subset."""
    if not patterns:
        return [BY_NAME[n] for n in QUICK] if quick else list(SPECS)
    chosen = []
    for pattern in patterns:
        hits = [pattern] if pattern in BY_NAME else [s.name for s in SPECS if pattern in s.name]
        if not hits:
            raise SystemExit(f"--models: {pattern!r} matches none of {', '.join(BY_NAME)}")
        chosen += hits
    return [s for s in SPECS if s.name in set(chosen)]


# --------------------------------------------------------------------------- measuring


def pick_device(name: str) -> torch.device:
    """Inference needs no DeepSpeed: 'auto' is the GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return device


def build(spec: Spec, img_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool):
    import timm

    kwargs = {"img_size": img_size} if not spec.conv else {}
    # Built on the device (no host-side init of ViT-L's 304 M parameters, then a copy).
    with torch.device(device):
        model = timm.create_model(spec.name, pretrained=False, num_classes=1000, **kwargs)
    model = model.eval().to(dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _input(batch: int, img_size: int, device, dtype, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def time_model(fn, x: torch.Tensor, device: torch.device, warmup: int, seconds: float,
               min_iters: int) -> Dict[str, Any]:
    """Warm-up (untimed: compile, autotuning), then about ``seconds`` of timed iterations.

    The iteration count is fixed before timing from the last warm-up iteration's time (measured
    with a synchronize), so the timed loop itself never waits on the device: on GPU each
    iteration is bracketed by CUDA events and read after one synchronize at the end."""
    clock = common.PhaseClock(device)
    first = None
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(x)
        clock.synchronize()
        first = time.perf_counter() - t0          # includes a compile, on the compiled side
        one = first
        for _ in range(max(warmup - 1, 0)):
            t0 = time.perf_counter()
            fn(x)
            clock.synchronize()
            one = time.perf_counter() - t0
        iters = max(min_iters, math.ceil(seconds / max(one, 1e-6)))
        marks = [clock.mark()]
        for _ in range(iters):
            fn(x)
            marks.append(clock.mark())
        clock.synchronize()
    per_iter = [clock.elapsed_ms(a, b) for a, b in zip(marks, marks[1:])]
    total_s = clock.elapsed_ms(marks[0], marks[-1]) / 1e3
    stats = common.summarize(per_iter)
    return {"img_per_sec": x.shape[0] * iters / total_s, "iters": iters, "timed_s": total_s,
            "ms_per_batch": stats["median"], "ms_p25": stats["p25"], "ms_p75": stats["p75"],
            "first_call_s": first}


def measure(spec: Spec, args, device: torch.device, dtype: torch.dtype, peak: "common.PeakFlops") -> List[Dict[str, Any]]:
    """The model's rows: eager and/or compiled at the largest batch that fits."""
    from fastdeit.flops import count_flops

    img_size = args.img_size or spec.img_size
    channels_last = {"auto": spec.conv, "on": True, "off": False}[args.channels_last]
    t0 = time.perf_counter()
    model = build(spec, img_size, device, dtype, channels_last)
    build_s = time.perf_counter() - t0
    gflops = count_flops(model, img_size, train=False) / 1e9
    params = sum(p.numel() for p in model.parameters())
    sides = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    rows = []
    batch = args.batch_cap
    for side in sides:
        fn = model if side == "eager" else torch.compile(model)
        while True:
            x = _input(batch, img_size, device, dtype, channels_last)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                timing = time_model(fn, x, device, args.warmup, args.seconds, args.min_iters)
                break
            except Exception as error:  # noqa: BLE001 - only CUDA OOM is retried
                if device.type != "cuda" or not _is_oom(error) or batch == 1:
                    raise
                del x
                batch //= 2                     # the largest batch that fits: halve and retry
                common.print_flush(f"  {spec.name}: out of memory, batch {batch * 2} -> {batch}")
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        mfu = timing["img_per_sec"] * gflops * 1e9 / peak.flops if peak.flops else None
        rows.append({
            "name": spec.name, "label": spec.label, "family": spec.family, "side": side,
            "img_size": img_size, "batch": batch, "dtype": common_dtype(dtype),
            "channels_last": channels_last, "params_m": params / 1e6, "gflops_per_image": gflops,
            "mfu": mfu, "peak_mem_gib": peak_mem, "build_s": build_s, **timing,
            "top1": spec.top1, "top1_source": spec.source, "paper_img_per_sec_v100": spec.paper_img_s,
        })
        common.print_flush(f"  {spec.label:<16} {side:<8} {img_size} px, batch {batch}: "
                           f"{timing['img_per_sec']:,.1f} img/s ({timing['ms_per_batch']:,.1f} ms/batch"
                           + (f", first call {timing['first_call_s']:.1f} s" if side == "compiled" else "") + ")")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def common_dtype(dtype: torch.dtype) -> str:
    from fastdeit.flops import dtype_name

    return dtype_name(dtype)


# --------------------------------------------------------------------------- ratios, tables, figure


def best(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per model, its fastest side (compiled where it was measured and faster)."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["name"] not in out or r["img_per_sec"] > out[r["name"]]["img_per_sec"]:
            out[r["name"]] = r
    return out


def ratios(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each model's eager img/s over the reference model's (ResNet-50, else the first model
    measured), beside the same ratio in the paper's V100 figures; and the compile speed-ups."""
    eager = {r["name"]: r for r in rows if r["side"] == "eager"} or {r["name"]: r for r in rows}
    if not eager:
        return []
    ref = eager.get(REFERENCE) or next(iter(eager.values()))
    out = []
    for r in eager.values():
        out.append({"name": r["name"], "kind": "vs_reference", "reference": ref["name"],
                    "ours": r["img_per_sec"] / ref["img_per_sec"],
                    "paper": r["paper_img_per_sec_v100"] / ref["paper_img_per_sec_v100"]})
    compiled = {r["name"]: r for r in rows if r["side"] == "compiled"}
    for name, c in compiled.items():
        if name in eager:
            out.append({"name": name, "kind": "compile_speedup", "ours": c["img_per_sec"] / eager[name]["img_per_sec"]})
    return out


def markdown(record: Dict[str, Any]) -> str:
    rows = record["rows"]
    ref = {r["name"]: r for r in record["ratios"] if r["kind"] == "vs_reference"}
    speedup = {r["name"]: r["ours"] for r in record["ratios"] if r["kind"] == "compile_speedup"}
    by_name: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault(r["name"], {})[r["side"]] = r
    table = []
    for name, sides in by_name.items():
        r = sides.get("eager") or sides["compiled"]
        rr = ref.get(name)
        table.append([
            r["label"], r["img_size"], r["batch"], r["dtype"] + (", NHWC" if r["channels_last"] else ""),
            common.fmt(sides["eager"]["img_per_sec"]) if "eager" in sides else "-",
            common.fmt(sides["compiled"]["img_per_sec"]) if "compiled" in sides else "-",
            f"{speedup[name]:.2f}x" if name in speedup else "-",
            f"{r['gflops_per_image']:.2f}", f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a",
            f"{r['top1']:.1f}",
            f"{rr['ours']:.2f}" if rr else "-", f"{rr['paper']:.2f}" if rr else "-",
        ])
    st = record["settings"]
    ref_label = BY_NAME[next(iter(ref.values()))["reference"]].label if ref else "-"
    lines = [
        common.record_header_md(record, f"Inference throughput against the DeiT paper's baselines{' (partial)' if record.get('partial') else ''}"),
        f"- precision: {record['precision']['name']} ({record['precision']['why']}); compile: {st['compile']}; "
        f"channels-last: {st['channels_last']} (convnets); batch: largest that fits up to {st['batch_cap']}"
        + ("" if record["hardware"]["device"] == "cuda" else " (CPU: the cap is the batch)")
        + f"; timing: {st['warmup']} warm-up iterations, then >= {st['seconds']} s and >= {st['min_iters']} iterations",
        f"- peak for MFU: {record['peak']['tflops']:,.4g} TFLOP/s {record['peak']['dtype']} ({record['peak']['source']})",
        "",
        common.markdown_table(
            ["model", "px", "batch", "dtype", "eager img/s", "compiled img/s", "compile", "GFLOPs/img", "MFU",
             "top-1 (paper)", f"img/s / {ref_label}", "same, paper (V100)"], table),
        "",
        f"Top-1 is the paper's, not measured here (random weights): {TABLE}. The last column divides the "
        f"paper's V100 throughputs the same way: ratios, not absolute figures, compare across devices.",
    ]
    if record.get("skipped"):
        lines.append(f"\nNot measured (the --budget ran out): {', '.join(record['skipped'])}.")
    return "\n".join(lines)


FAMILY_STYLE = {"EfficientNet": ("#1b9e77", "o"), "RegNetY": ("#7570b3", "s"), "ResNet": ("#666666", "D"),
                "ViT": ("#e7298a", "^"), "DeiT": ("#d95f02", "o"), "DeiT⚗": ("#b8120b", "*")}


def figure(record: Dict[str, Any], path: Path) -> Path:
    """The paper's Figure 1: throughput (images/s, log scale) against ImageNet top-1, one line
    per family, each model its fastest measured side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fastest = best(record["rows"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family, (colour, marker) in FAMILY_STYLE.items():
        pts = sorted(((r["img_per_sec"], r["top1"], r["label"]) for r in fastest.values() if r["family"] == family),
                     key=lambda p: p[0])
        if not pts:
            continue
        xs, ys, labels = zip(*pts)
        ax.plot(xs, ys, marker=marker, color=colour, label=family, markersize=9 if marker == "*" else 6,
                linewidth=1.3)
        for x, y, lab in pts:
            ax.annotate(lab, (x, y), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=colour)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.3g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("throughput (images/s, log scale)")
    ax.set_ylabel("ImageNet top-1 (%, the paper's)")
    hw = record["hardware"]
    where = hw.get("gpu") or f"{hw['cpu']} ({hw['torch_threads']} threads)"
    st = record["settings"]
    ax.set_title(f"Throughput vs ImageNet top-1 (DeiT paper, Figure 1) on {where}\n"
                 f"{record['precision']['name']}, batch up to {st['batch_cap']}, "
                 + {"off": "eager", "on": "compiled", "both": "the faster of eager and compiled"}[st["compile"]]
                 + (", partial" if record.get("partial") else ""), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.text(0.01, 0.01, f"top-1: {PAPER}, Table 5; throughput: measured here, {record['date']}", fontsize=6.5,
             color="#444444")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- the run


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="timm names, or parts of them (deit_small matches DeiT-S and DeiT-S distilled); default all")
    p.add_argument("--quick", action="store_true",
                   help="the CPU run: DeiT-Ti/S, ResNet-50, RegNetY-4GF, EfficientNet-B0 (unless --models), "
                        "batch 8, eager, 1 warm-up, 2 s each")
    p.add_argument("--batch-cap", type=int, default=None,
                   help="largest batch tried (CUDA halves it until it fits; the CPU uses it as is); "
                        "default 256, 8 with --quick")
    p.add_argument("--img-size", type=int, default=None, help="every model at this size (tests); default the paper's")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 where the device has native bf16, else fp32 (fastdeit.precision)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="auto: the convnets only")
    p.add_argument("--compile", choices=["off", "on", "both"], default=None,
                   help="eager (off), torch.compile (on) or both side by side; default both, off with --quick")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per side (default 3, 1 with --quick)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per side (default 1, 2 with --quick)")
    p.add_argument("--min-iters", type=int, default=3, help="timed iterations at least")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: start no further model after this much of the run (the GPU suite's cap)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU's peak (default: data sheet or measured)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--out", default=str(common.RESULTS), help="directory for the JSON / markdown / PNG record")
    p.add_argument("--name", default=None, help="suffix of the record's file name")
    p.add_argument("--readme", default=None, help="also splice the table into this markdown file")
    args = p.parse_args(argv)
    quick = args.quick
    for key, full, small in (("batch_cap", 256, 8), ("compile", "both", "off"), ("warmup", 3, 1), ("seconds", 1.0, 2.0)):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.batch_cap < 1:
        p.error("--batch-cap must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from fastdeit import precision as precision_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    specs = select(args.models, args.quick)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # each conv shape autotuned once, in the warm-up
    chosen = precision_lib.resolve(args.precision, device, "--precision")
    record = common.base_record("infer", device, argv)
    peak = common.PeakFlops(device, args.peak_tflops, dtype=chosen.dtype)
    record.update(
        settings={"models": [s.name for s in specs], "batch_cap": args.batch_cap, "img_size": args.img_size,
                  "compile": args.compile, "channels_last": args.channels_last, "warmup": args.warmup,
                  "seconds": args.seconds, "min_iters": args.min_iters, "budget": args.budget},
        precision={"name": chosen.name, "why": chosen.why}, peak=peak.record(),
        top1_table={s.name: {"label": s.label, "top1": s.top1, "source": s.source, "img_size": s.img_size,
                             "paper_img_per_sec_v100": s.paper_img_s} for s in specs},
        rows=[], ratios=[], skipped=[], partial=True)
    common.print_flush(f"infer: {len(specs)} models on {device} in {chosen.name} ({chosen.why}); "
                       f"batch up to {args.batch_cap}, compile {args.compile}")
    for i, spec in enumerate(specs):
        if args.budget is not None and time.perf_counter() - start > args.budget:
            record["skipped"] = [s.name for s in specs[i:]]
            common.print_flush(f"budget of {args.budget:g} s spent: not measured: {', '.join(record['skipped'])}")
            break
        record["rows"] += measure(spec, args, device, chosen.dtype, peak)
        record["ratios"] = ratios(record["rows"])
        common.write_partial(record, device, args)
    record["partial"] = False
    record["wall_s"] = time.perf_counter() - start
    record["ratios"] = ratios(record["rows"])
    text = markdown(record)
    common.print_flush(text)
    stem = common.result_stem(record, device, args.name)
    paths = common.write_record(record, text, Path(args.out), stem)
    paths["png"] = figure(record, Path(args.out) / f"{stem}.png")
    if args.readme:
        common.update_readme(Path(args.readme), "infer", text)
    record["files"] = {k: str(v) for k, v in paths.items()}
    common.print_flush("wrote " + ", ".join(str(p) for p in paths.values()))
    return record


if __name__ == "__main__":
    main()
