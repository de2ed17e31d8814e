"""The short table that benchmarks/gpu_suite.sh prints last, from the records of one suite run.

    python -m benchmarks.suite_summary RECORDS_DIR [--wall SECONDS]   # markdown on stdout
    python -m benchmarks.suite_summary --versions                      # the suite's first stage

Reads what the stages wrote under RECORDS_DIR: stages.tsv (one line per stage: name, status,
seconds), pytest_gpu.xml (junit), memory-*.json (benchmarks/memory.py), *-step-suite.json,
*-e2e-suite.json and data.json (the benchmarks' own records). A missing record shows as a
missing row, never as an error: the table must come out even when a stage failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional


def versions() -> str:
    lines = [f"python {sys.version.split()[0]}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPUs visible)")
    except Exception as e:  # noqa: BLE001 - report, don't stop
        lines.append(f"torch: {e}")
    for module in ("timm", "nvidia.dali", "deepspeed", "torchvision", "pytest"):
        try:
            lines.append(f"{module} {__import__(module, fromlist=['__version__']).__version__}")
        except Exception as e:  # noqa: BLE001
            lines.append(f"{module}: not importable ({type(e).__name__}: {e})")
    return "\n".join(lines)


def _load(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _one(rec: Path, pattern: str) -> Optional[Dict[str, Any]]:
    found = sorted(rec.glob(pattern))
    return _load(found[-1]) if found else None


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def stages(rec: Path) -> List[List[str]]:
    path = rec / "stages.tsv"
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def pytest_counts(rec: Path) -> Optional[str]:
    try:
        root = ET.parse(rec / "pytest_gpu.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    get = lambda k: int(suite.get(k, 0))  # noqa: E731
    passed = get("tests") - get("failures") - get("errors") - get("skipped")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = f"{passed} passed, {get('failures')} failed, {get('errors')} errors, {get('skipped')} skipped"
    return text + (f" (failed: {', '.join(failed[:5])})" if failed else "")


def table(rec: Path, wall: Optional[int] = None) -> str:
    rows: List[List[str]] = []
    hw = None
    step = _one(rec, "*-step-suite.json")
    if step:
        hw = step["hardware"].get("gpu") or f"CPU ({step['hardware']['cpu_cores']} cores)"
        for v in step["variants"]:
            rows.append([f"step {v['name']}", f"{_f(v['img_per_sec'])} img/s",
                         f"MFU {100 * v['mfu']:.1f}%, peak {_f(v['peak_mem_gib'], 2)} GiB"])
        rows.append(["step MFU peak", f"{step['peak']['tflops']:,.4g} TFLOP/s", step["peak"]["source"]])
        for r in step["ratios"]:
            rows.append([f"step ratio: {r['name']}", f"{r['value']:.3f}", r.get("target", "") or r["meaning"]])
        if step.get("memory"):
            m = step["memory"]
            rows.append(["step run peak memory",
                         f"{_f(m.get('allocated_gib'), 2)} GiB" if m["kind"] == "device" else f"{_f(m.get('rss_gib'), 2)} GiB",
                         m["kind"]])
    mem = _load(rec / "memory-step.json")
    if mem:
        rows.append([f"memory: {mem['model']} step, batch {mem['batch']}",
                     f"{_f(mem['peak_allocated_gib'], 2)} GiB peak" if mem["peak_allocated_gib"] is not None
                     else f"{_f(mem['max_rss_gib'], 2)} GiB max RSS",
                     f"resident {_f(mem['resident_after_warmup_gib'], 2)} GiB after warm-up, ZeRO buckets "
                     f"{mem.get('reduce_bucket_size')}"])
    for name, label in (("memory-pipeline.json", "preallocated"), ("memory-pipeline-noprealloc.json", "no prealloc")):
        p = _load(rec / name)
        if p:
            rows.append([f"memory: train pipeline ({label}), {p['dali_threads']} DALI threads",
                         f"device +{_f(p['first_epoch_device_gib'], 2)} GiB, RSS +{_f(p['first_epoch_rss_gib'], 2)} GiB",
                         f"predicted {p['predicted_prealloc_device_gib']:.2f} + {p['predicted_prealloc_pinned_gib']:.2f} "
                         f"pinned; later epochs device +{_f(p['later_epochs_device_growth_gib'], 2)}, RSS "
                         f"+{_f(p['later_epochs_rss_growth_gib'], 2)}"])
    data = _load(rec / "data.json")
    if data:
        ips = data["images_per_sec_steady"]
        rows.append(["data path: fastdeit / reference loader", f"{_f(ips.get('ours'), 0)} / {_f(ips.get('baseline'), 0)} img/s",
                     f"ratio {data['ratio_ours_over_baseline']:.2f}x"])
    e2e = _one(rec, "*-e2e-suite.json")
    if e2e:
        for side in e2e["sides"]:
            rows.append([f"e2e {side['name']}", f"{_f(side['img_per_sec'])} img/s",
                         f"data wait {100 * side['data_wait']:.0f}%, MFU {100 * side['mfu']:.1f}%, "
                         f"peak {_f(side['peak_mem_gib'], 2)} GiB"])
        rows.append(["e2e MFU peak", f"{e2e['peak']['tflops']:,.4g} TFLOP/s", e2e["peak"]["source"]])
        for r in e2e["ratios"]:
            rows.append([f"e2e ratio: {r['name']}", f"{r['value']:.3f}", r["meaning"]])
    counts = pytest_counts(rec)
    lines = ["## GPU suite" + (f" on {hw}" if hw else "") + (f", {wall} s" if wall is not None else ""), ""]
    st = stages(rec)
    if st:
        lines.append("stages: " + ", ".join(f"{s[0]} {s[1]}" + (f" ({s[2]} s)" if len(s) > 2 and s[2] != "-" else "")
                                            for s in st))
        lines.append("")
    lines.append(f"pytest -m gpu: {counts or 'no record'}")
    lines += ["", "| what | value | detail |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="?", help="the suite's records folder")
    p.add_argument("--wall", type=int, default=None, help="the suite's wall time so far, seconds")
    p.add_argument("--versions", action="store_true", help="print the library versions instead")
    args = p.parse_args(argv)
    if args.versions:
        print(versions())
        return 0
    if not args.records:
        p.error("RECORDS_DIR is required (or --versions)")
    sys.stdout.write(table(Path(args.records), args.wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
