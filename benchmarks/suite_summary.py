"""The short table that benchmarks/gpu_suite.sh prints last (and rewrites after every stage),
from the records of one suite run.

    python -m benchmarks.suite_summary RECORDS_DIR [--wall SECONDS]   # markdown on stdout
    python -m benchmarks.suite_summary --versions                      # the smoke stage's first lines

Reads what the stages wrote under RECORDS_DIR: stages.tsv (one line per stage: name, status,
seconds, cap), the benchmarks' records (*-e2e-suite.json, *-step-{suite,compile,extras}.json,
data.json, memory-*.json, *-infer-suite.json; a record with "partial": true is what a stopped run had measured)
and pytest_gpu.xml (junit). The headline comes first: distilled DeiT-B images/sec from JPEGs,
fastdeit against the reference-style loop. Every figure the suite should deliver and did not is
named under "Missing", with its stage's fate; the table itself always comes out.

MFU is printed with the dtype of its peak; a figure above 100% is not printed as one (the peak
was not that step's ceiling, e.g. a bf16 peak measured on a CPU that emulates bf16).
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


def gib(value: Optional[float]) -> str:
    return "n/a (GPU only)" if value is None else f"{value:,.2f} GiB"


def mfu(value: Optional[float], row: Dict[str, Any]) -> str:
    """'MFU 41.2% (bf16)': the share of the peak of the dtype the row computed in."""
    if value is None:
        return "MFU n/a"
    dtype = row.get("compute_dtype", "bf16")
    if not 0.0 < value <= 1.0:
        return f"MFU n/a ({100 * value:.0f}% of the {dtype} peak: that peak is not this step's ceiling)"
    return f"MFU {100 * value:.1f}% ({dtype})"


MODELS = {"deit_tiny": "DeiT-Ti", "deit_small": "DeiT-S", "deit_base": "DeiT-B"}


def model_name(settings: Dict[str, Any]) -> str:
    name = MODELS.get(settings.get("model") or settings.get("student", "").replace("_patch16_224", ""), "DeiT")
    return name + (" (debug sizes)" if settings.get("model_kwargs") else "")


def _partial(record: Dict[str, Any]) -> str:
    if not record.get("partial"):
        return ""
    rounds = record.get("settings", {}).get("rounds", "?")
    return f" (partial: {record.get('rounds_done', 0)} of {rounds} rounds)"


# What each stage must deliver: (stage, record glob, the figure it carries).
EXPECTED = [
    ("smoke", "smoke.log", "versions, doctor and the GPU data-path tests"),
    ("e2e", "*-e2e-suite.json", "the headline: distilled DeiT end to end from JPEGs, fastdeit vs the reference loop"),
    ("step", "*-step-suite.json", "the step alone, distilled (img/s, MFU)"),
    ("step_compile", "*-step-compile.json", "compile on/off of the student-only step"),
    ("data", "data.json", "the data path alone vs the PIL/DataLoader reference, and 3-Augment"),
    ("memory", "memory-step.json", "the distilled step's memory"),
    ("memory", "memory-pipeline.json", "one train pipeline's memory"),
    ("step_extras", "*-step-extras.json", "EMA and LAMB cost, one size of a resolution schedule"),
    ("infer", "*-infer-suite.json", "inference img/s of DeiT against the paper's baselines (its Figure 1)"),
    ("pytest_gpu", "pytest_gpu.xml", "pytest -m gpu"),
]


def missing(rec: Path) -> List[str]:
    """One line per expected figure that has no record, or only a partial one, with the reason."""
    fate = {s[0]: s for s in stages(rec)}
    out = []
    for name, pattern, what in EXPECTED:
        found = sorted(rec.glob(pattern))
        record = _load(found[-1]) if found and pattern.endswith(".json") else None
        if found and not (record and record.get("partial")):
            continue
        s = fate.get(name)
        if s is None:
            why = "its stage never started (the call ended first)"
        elif s[1] == "skipped":
            why = "its stage was skipped: no time left in the budget"
        elif s[1] == "timeout":
            why = f"its stage hit its cap ({s[3] if len(s) > 3 else '?'} s)"
        elif s[1] == "ok":
            why = "its stage ended without writing it"
        else:
            why = f"its stage {s[1]} after {s[2]} s (see suite.log)"
        state = ((f"partial ({record['rounds_done']} rounds done)" if "rounds_done" in record else "partial")
                 if record else "missing")
        out.append(f"- {state}: {what}: {why}")
    return out


def headline(e2e: Optional[Dict[str, Any]]) -> List[str]:
    if not e2e or not e2e.get("sides"):
        return ["**Headline (end to end from JPEGs): missing** (see below)"]
    st = e2e["settings"]
    by = {s["name"]: s for s in e2e["sides"]}
    label = model_name(st) + ("⚗" if st.get("teacher", "none") != "none" else "")
    teacher = f", teacher {st['teacher']}" if st.get("teacher", "none") != "none" else ""
    ours, ref = by.get("fastdeit"), by.get("baseline")
    line = f"**{label} from JPEGs: {_f(ours['img_per_sec']) if ours else 'n/a'} img/s** with fastdeit"
    if ref:
        line += f" against {_f(ref['img_per_sec'])} img/s for the reference-style loop"
    for r in e2e.get("ratios", []):
        if r["name"] == "speed-up":
            line += f": **{r['value']:.2f}x**"
    workers = f"{st['workers']} loader worker{'' if st['workers'] == 1 else 's'}"
    return [line + f" ({st['img_size']} px, batch {st['batch']}, {workers}{teacher})"
            + _partial(e2e)]


def peak_row(label: str, record: Dict[str, Any]) -> List[str]:
    """The MFU's denominator and where it came from, with its dtype (bf16 unless it says)."""
    peak = record["peak"]
    return [f"{label} MFU peak", f"{peak['tflops']:,.4g} TFLOP/s", f"{peak.get('dtype', 'bf16')}: {peak['source']}"]


def step_rows(record: Dict[str, Any], label: str, ratios_only: bool = False) -> List[List[str]]:
    rows = []
    if not ratios_only:
        for v in record["variants"]:
            rows.append([f"{label} {v['name']}", f"{_f(v['img_per_sec'])} img/s",
                         f"{mfu(v.get('mfu'), v)}, peak {gib(v['peak_mem_gib'])}" + _partial(record)])
        rows.append(peak_row(label, record))
    for r in record["ratios"]:
        rows.append([f"{label} ratio: {r['name']}", f"{r['value']:.3f}", r.get("target", "") or r["meaning"]])
    return rows


def infer_rows(record: Optional[Dict[str, Any]]) -> List[List[str]]:
    """benchmarks/infer.py: one row per model (img/s, batch, dtype, MFU), its throughput over
    ResNet-50's beside the same ratio in the paper's V100 figures, and what the budget left out."""
    if not record:
        return []
    ref = {r["name"]: r for r in record.get("ratios", []) if r["kind"] == "vs_reference"}
    rows = []
    for r in record["rows"]:
        rr = ref.get(r["name"]) if r["side"] == "eager" else None
        vs = f"; {rr['ours']:.2f}x {rr['reference']} (paper {rr['paper']:.2f}x)" if rr else ""
        rows.append([f"infer {r['label']} {r['side']}", f"{_f(r['img_per_sec'])} img/s",
                     f"{r['img_size']} px, batch {r['batch']}, {r['dtype']}, {mfu(r.get('mfu'), {'compute_dtype': r['dtype']})}"
                     f"{vs}; top-1 {r['top1']} (paper)" + (" (partial)" if record.get("partial") else "")])
    if record.get("skipped"):
        rows.append(["infer: not measured", str(len(record["skipped"])), "budget spent: " + ", ".join(record["skipped"])])
    return rows


def table(rec: Path, wall: Optional[int] = None) -> str:
    rows: List[List[str]] = []
    hw = None
    e2e = _one(rec, "*-e2e-suite.json")
    if e2e:
        hw = e2e["hardware"].get("gpu") or f"CPU ({e2e['hardware']['cpu_cores']} cores)"
        for side in e2e["sides"]:
            rows.append([f"e2e {side['name']}", f"{_f(side['img_per_sec'])} img/s",
                         f"data wait {100 * side['data_wait']:.0f}%, {mfu(side.get('mfu'), side)}, "
                         f"peak {gib(side['peak_mem_gib'])}" + _partial(e2e)])
        rows.append(peak_row("e2e", e2e))
        for r in e2e["ratios"]:
            rows.append([f"e2e ratio: {r['name']}", f"{r['value']:.3f}", r["meaning"]])
        for side in e2e["sides"]:
            if side.get("boundary_wait_ms") is not None:
                rows.append([f"e2e epoch boundary, {side['name']}", f"{_f(side['boundary_wait_ms'])} ms",
                             f"blocked at an epoch's first batch (median of {side['boundaries']}; steady steps "
                             f"{_f(side['steady_wait_ms'])} ms), untimed; every {side['batches_per_epoch']} batches here"])
    step = _one(rec, "*-step-suite.json")
    if step:
        hw = hw or step["hardware"].get("gpu") or f"CPU ({step['hardware']['cpu_cores']} cores)"
        rows += step_rows(step, "step")
        if step.get("memory"):
            m = step["memory"]
            rows.append(["step run peak memory",
                         f"{_f(m.get('allocated_gib'), 2)} GiB" if m["kind"] == "device" else f"{_f(m.get('rss_gib'), 2)} GiB",
                         m["kind"]])
    compiled = _one(rec, "*-step-compile.json")
    if compiled:
        # Its eager side is the suite's student-only step (the step stage times the distilled one).
        rows += [r for r in step_rows(compiled, "compile") if "peak" not in r[0]]
    data = _load(rec / "data.json")
    if data:
        ips = data.get("images_per_sec_steady", {})
        ratio = data.get("ratio_ours_over_baseline")
        rows.append(["data path: fastdeit / reference loader",
                     f"{_f(ips.get('ours'), 0)} / {_f(ips.get('baseline'), 0)} img/s",
                     (f"ratio {ratio:.2f}x" if ratio is not None else "ratio n/a")
                     + (" (partial)" if data.get("partial") else "")])
        if "ours-3aug" in ips:
            rows.append(["data path: fastdeit with 3-Augment", f"{_f(ips['ours-3aug'], 0)} img/s",
                         "DeiT III's 3-Augment in place of RandAugment"])
    mem = _load(rec / "memory-step.json")
    if mem:
        rows.append([f"memory: {mem['model']} step, batch {mem['batch']}",
                     f"{_f(mem['peak_allocated_gib'], 2)} GiB peak" if mem["peak_allocated_gib"] is not None
                     else f"{_f(mem['max_rss_gib'], 2)} GiB max RSS",
                     f"resident {_f(mem['resident_after_warmup_gib'], 2)} GiB after warm-up, ZeRO buckets "
                     f"{mem.get('reduce_bucket_size')}"])
    p = _load(rec / "memory-pipeline.json")
    if p:
        rows.append([f"memory: train pipeline, {p['dali_threads']} DALI threads",
                     f"device +{_f(p['first_epoch_device_gib'], 2)} GiB, RSS +{_f(p['first_epoch_rss_gib'], 2)} GiB",
                     f"predicted {p['predicted_prealloc_device_gib']:.2f} + {p['predicted_prealloc_pinned_gib']:.2f} "
                     f"pinned; later epochs device +{_f(p['later_epochs_device_growth_gib'], 2)}, RSS "
                     f"+{_f(p['later_epochs_rss_growth_gib'], 2)}"])
    extras = _one(rec, "*-step-extras.json")
    if extras:
        rows += step_rows(extras, "extras", ratios_only=True)
    rows += infer_rows(_one(rec, "*-infer-suite.json"))
    counts = pytest_counts(rec)
    lines = ["## GPU suite" + (f" on {hw}" if hw else "") + (f", {wall} s" if wall is not None else ""), ""]
    lines += headline(e2e) + [""]
    st = stages(rec)
    if st:
        lines.append("stages: " + ", ".join(f"{s[0]} {s[1]}" + (f" ({s[2]} s)" if len(s) > 2 and s[2] != "-" else "")
                                            for s in st))
        lines.append("")
    lines.append(f"pytest -m gpu: {counts or 'no record'}")
    lines += ["", "| what | value | detail |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    gone = missing(rec)
    if gone:
        lines += ["", "Missing:", *gone]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="?", help="the suite's records folder")
    p.add_argument("--wall", type=int, default=None, help="the suite's wall time so far, seconds")
    p.add_argument("--versions", action="store_true", help="print the versions of what the suite uses")
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
