"""Training-step throughput, side by side in one run: fastdeit's step against ViT baselines.

    python -m benchmarks.step --model b --batch 256 --zero-stage 1 2          # a GPU
    python -m benchmarks.step --model ti --batch 32 --zero-stage 0 1 2        # this repo's CPU record

Synthetic batches already on the device (no data loading; see benchmarks/e2e.py for that).
Every variant computes in one precision, ``--precision`` (auto as the trainer's
engine.precision: bf16 where the device runs it natively, else fp32; "bf16" below is that
precision, and in fp32 the plain loops and baseline B run without autocast).
Variants, all at the same model size, batch and resolution:

  fastdeit[zN]          the trainer's own step (fastdeit.build's parts run by fastdeit.step,
                        benchmarks/variants.py): DeepSpeed engine at ZeRO
                        stage N, bf16, our optimizer (fastdeit.optim.build_optimizer), per-step
                        LR, the distilled student plus the frozen channels-last bf16 teacher
                        (FrozenTeacher), hard distillation (DeiTLoss), device-side loss meters.
                        Batch mixing (BatchMixer) only with --mixing; label smoothing always.
  fastdeit-student[zN]  the same without the teacher: plain student, DeiTLoss 'none'.
  ds-defaults[zN]       (opt-in) fastdeit-student with DeepSpeed's own bf16 defaults put back
                        (gradient overflow check and global grad norm every step), to show
                        what fastdeit.engine's overrides of them save.
  fastdeit-ema[zN]      (opt-in) fastdeit-student plus the model EMA (fastdeit.ema, decay
                        0.99996, updated every step from the fp32 masters): the EMA's cost.
  fastdeit-lamb[zN]     (opt-in) fastdeit-student with DeiT III's LAMB (optim.name=lamb,
                        fastdeit.lamb, with engine.gradient_clipping as configs/deit3_b.yaml
                        sets it) instead of AdamW: the optimizer's cost.
  wrap-compiled[zN]     (opt-in, with --compile) fastdeit-student compiled by torch.compile before
                        deepspeed.initialize wraps it, against engine.compile() (what the trainer
                        does, fastdeit.engine.initialize).
  bare-student          a bare PyTorch loop of the same student and the same optimizer in bf16
                        (autocast over fp32 weights): the yardstick for framework overhead.
  A:vit-recipe          the usual ViT recipe: timm vit_<size>_patch16 in a plain loop, autocast
                        bf16, torch AdamW with its default implementation, cross entropy with
                        label smoothing.
  B:deit-reference      the step as published with DeiT: distilled student, fp16 autocast with a
                        GradScaler, loss.item() and a device synchronize every step, the teacher
                        in fp32 NCHW under the same autocast, unfused (per-parameter) AdamW.
                        On CPU the autocast dtype is the run's precision, since CPUs without
                        fp16 matmul units run fp16 hundreds of times slower, which would measure
                        nothing useful.

Per variant: images/sec and ms/step (median over the timed steps after warm-up; CUDA events
on GPU, perf_counter on CPU), the forward / backward / optimizer split, peak memory (GPU), and
MFU from FLOPs counted with torch's FLOP counter (fastdeit.flops) against the peak training
runs use (fastdeit.flops.peak_flops, in the run's precision): --peak-tflops, else a known GPU's
data-sheet dense figure for it, else a matmul in it measured on the benchmark's threads. Variants run interleaved in rounds (a few steps of each, rotating the
order) so that drifting clocks and noisy neighbours hit all of them alike. ``--compile both``
builds every variant but baseline B twice, eager and compiled (named ``...+compile``), so the
two are measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import common
from benchmarks.variants import Setup, StepSettings, Variant, factories, reference_amp
from fastdeit import engine as engine_lib


@dataclass
class StepRun:
    """A parsed command line: what to build, how to time it, where to write."""

    settings: StepSettings
    rounds: common.Rounds
    run: common.RunSettings


# --------------------------------------------------------------------------- measuring


def run_steps(v: Variant, n: int, clock: common.PhaseClock) -> List[List[Any]]:
    """n steps; returns per step [start, after forward, after backward] and a final mark."""
    marks: List[List[Any]] = []
    for _ in range(n):
        start = clock.mark()
        v.forward(v.s.fresh_images(), v.s.labels)     # the variant's own size
        fwd = clock.mark()
        v.backward()
        bwd = clock.mark()
        v.update()
        marks.append([start, fwd, bwd])
    marks.append([clock.mark()])
    return marks


def phase_times(marks: List[List[Any]], clock: common.PhaseClock) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {"step": [], "forward": [], "backward": [], "optimizer": []}
    for (start, fwd, bwd), nxt in zip(marks[:-1], marks[1:]):
        out["step"].append(clock.elapsed_ms(start, nxt[0]))
        out["forward"].append(clock.elapsed_ms(start, fwd))
        out["backward"].append(clock.elapsed_ms(fwd, bwd))
        out["optimizer"].append(clock.elapsed_ms(bwd, nxt[0]))
    return out


def measure(s: Setup, rounds: common.Rounds, peak: common.PeakFlops, log=common.print_flush,
            on_round: Optional[Callable[[List[Dict[str, Any]], int], None]] = None,
            ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """(a row per variant, the run's peak memory). ``on_round(rows, rounds_done)`` gets the rows
    measured so far after every round."""
    clock = common.PhaseClock(s.device)
    runs = common.Interleaved(s.device, log)
    times: Dict[str, Dict[str, List[float]]] = {}

    def warm(v: Variant) -> None:
        run_steps(v, rounds.warmup, clock)
        clock.synchronize()
        times[v.name] = {}
        log(f"  built and warmed {v.name}")

    def window(v: Variant) -> None:
        if rounds.rewarm:
            run_steps(v, rounds.rewarm, clock)        # re-warm after the other variants ran
        marks = run_steps(v, rounds.steps, clock)
        clock.synchronize()
        for phase, values in phase_times(marks, clock).items():
            times[v.name].setdefault(phase, []).extend(values)

    for factory in factories(s):
        runs.build(factory, warm)
    runs.run(rounds.rounds, window, peak,
             on_round and (lambda done: on_round(variant_rows(runs, times, s.batch), done)))
    return variant_rows(runs, times, s.batch), runs.probe.run_peak()


def variant_rows(runs: common.Interleaved, times: Dict[str, Dict[str, List[float]]], batch: int
                 ) -> List[Dict[str, Any]]:
    out = []
    for v in runs.built:
        res = times[v.name]
        step = common.summarize(res["step"])
        ips = batch / (step["median"] / 1e3)
        out.append({
            "name": v.name, "kind": v.kind, "zero_stage": v.stage, "compiled": v.compiled, "about": v.about,
            "compute_dtype": v.compute_dtype,
            "img_size": v.s.img_size, "base": v.name[: len(v.name) - len(v.s.tag)] if v.s.tag else v.name,
            "img_per_sec": ips, "ms_per_step": step["median"], "ms_p25": step["p25"], "ms_p75": step["p75"],
            "ms_best": step["min"], "img_per_sec_best": batch / (step["min"] / 1e3),
            "ms_phases": {p: common.summarize(res[p])["median"] for p in ("forward", "backward", "optimizer")},
            "steps_timed": step["n"],
            "peak_mem_gib": runs.peak_mem_gib(v.name),
            "flops_per_image": v.flops_per_image,
            "tflops_per_sec": ips * v.flops_per_image / 1e12,
        })
    return out


def ratios(rows: List[Dict[str, Any]], stages: Sequence[int], patch: int = 16) -> List[Dict[str, Any]]:
    by = {r["name"]: r for r in rows}
    out = []

    best = {"ms_per_step": "ms_best", "img_per_sec": "img_per_sec_best"}

    def add(name, num, den, key, meaning, target=None):
        if num in by and den in by:
            a, b = by[num][key], by[den][key]
            out.append({"name": name, "numerator": num, "denominator": den, "of": key, "value": a / b,
                        "value_best": by[num][best[key]] / by[den][best[key]],
                        "meaning": meaning, **({"target": target} if target else {})})

    # Per size tag ("@<side>" when several sizes ran, else ""), the same ratios among eager and
    # among compiled variants.
    tags = list(dict.fromkeys(r["name"][len(r["base"]):] for r in rows))
    for t in tags:
        for c in ("", "+compile"):
            ct = (" compiled" if c else "") + t
            for z in stages:
                add(f"overhead z{z}{ct}", f"fastdeit-student[z{z}]{c}{t}", f"bare-student{c}{t}", "ms_per_step",
                    "fastdeit step time / bare PyTorch step time, same student, optimizer, bf16", "<= 1.10")
                add(f"speed-up vs A z{z}{ct}", f"fastdeit-student[z{z}]{c}{t}", f"A:vit-recipe{c}{t}", "img_per_sec",
                    "fastdeit student-only img/s / usual ViT recipe img/s")
                add(f"speed-up vs B z{z}{ct}", f"fastdeit[z{z}]{c}{t}", f"B:deit-reference{t}", "img_per_sec",
                    "fastdeit distillation img/s / DeiT reference step img/s")
                add(f"teacher cost z{z}{ct}", f"fastdeit[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with frozen teacher + distillation / without")
                add(f"DS defaults z{z}{ct}", f"ds-defaults[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with DeepSpeed's bf16 defaults / with fastdeit.engine's config")
                add(f"EMA cost z{z}{ct}", f"fastdeit-ema[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with the model EMA updated every step / without")
                add(f"LAMB cost z{z}{ct}", f"fastdeit-lamb[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with LAMB / with AdamW")
        for z in stages:
            add(f"compile speed-up z{z}{t}", f"fastdeit-student[z{z}]+compile{t}", f"fastdeit-student[z{z}]{t}",
                "img_per_sec", "student img/s compiled (engine.compile) / eager")
            add(f"compile speed-up distilled z{z}{t}", f"fastdeit[z{z}]+compile{t}", f"fastdeit[z{z}]{t}",
                "img_per_sec", "distillation img/s, student and teacher compiled / eager")
            add(f"engine.compile vs wrap z{z}{t}", f"fastdeit-student[z{z}]+compile{t}", f"wrap-compiled[z{z}]{t}",
                "ms_per_step", "step time with engine.compile() / with torch.compile before deepspeed.initialize")
        add(f"compile speed-up bare{t}", f"bare-student+compile{t}", f"bare-student{t}", "img_per_sec",
            "bare loop img/s compiled / eager")
    # Several sizes (data.size_schedule): each variant's speed-up at a smaller side over its
    # speed at the largest, next to what the patch-token and counted-FLOP ratios predict.
    for base in dict.fromkeys(r["base"] for r in rows if r["name"] != r["base"]):
        same = sorted((r for r in rows if r["base"] == base), key=lambda r: -r["img_size"])
        top = same[0]
        for r in same[1:]:
            add(f"{base} {top['img_size']}->{r['img_size']}", r["name"], top["name"], "img_per_sec",
                f"img/s at {r['img_size']} / img/s at {top['img_size']}")
            out[-1].update(token_ratio=(top["img_size"] // patch) ** 2 / (r["img_size"] // patch) ** 2,
                           flops_ratio=top["flops_per_image"] / r["flops_per_image"])
            out[-1]["meaning"] += (f"; patch tokens {out[-1]['token_ratio']:.2f}x fewer, "
                                   f"counted FLOPs {out[-1]['flops_ratio']:.2f}x fewer")
    return out


# --------------------------------------------------------------------------- reporting


COLUMNS = ["variant", "img/s", "ms/step (p25-p75)", "fwd / bwd / opt ms", "peak GiB", "GFLOP/img", "TFLOP/s", "MFU"]


def table_rows(rows: List[Dict[str, Any]], peak: float) -> List[List[str]]:
    out = []
    for r in rows:
        ph = r["ms_phases"]
        out.append([
            r["name"], f"{r['img_per_sec']:,.1f}", f"{r['ms_per_step']:,.1f} ({r['ms_p25']:,.1f}-{r['ms_p75']:,.1f})",
            f"{ph['forward']:,.1f} / {ph['backward']:,.1f} / {ph['optimizer']:,.1f}",
            common.fmt(r["peak_mem_gib"], 2), f"{r['flops_per_image'] / 1e9:,.2f}",
            f"{r['tflops_per_sec']:,.3f}", f"{100 * r['mfu']:.1f}%",
        ])
    return out


RATIO_COLUMNS = ["ratio", "median", "best", "of", "target", "meaning"]


def ratio_rows(rs: List[Dict[str, Any]]) -> List[List[str]]:
    return [[r["name"], f"{r['value']:.3f}", f"{r['value_best']:.3f}",
             f"{r['numerator']} / {r['denominator']} ({r['of']})", r.get("target", ""), r["meaning"]] for r in rs]


def markdown(record: Dict[str, Any]) -> str:
    st = record["settings"]
    peak = record["peak"]
    model = common.model_label(st["student"], st["model_kwargs"])
    lines = [common.record_header_md(record, f"Training step: {model} at {size_label(st)}px, batch {st['batch']}"),
             f"- settings: ZeRO {st['zero_stage']}, compile {st['compile']} ({st.get('compile_mode', 'default')}), teacher "
             f"{st['teacher']} ({st['teacher_format']}), mixing {'on' if st['mixing'] else 'off (label smoothing only)'}, "
             f"{st['warmup']} warm-up + {st['rounds']} rounds x {st['steps']} timed steps per variant, interleaved",
             f"- MFU peak: {peak['tflops']:,.3g} TFLOP/s per device ({peak['source']})"
             + (f"; datasheet {peak['datasheet_tflops']:,.0f}" if peak.get("datasheet_tflops") else ""),
             *([f"- {common.peak_memory_md(record['memory'])}"] if record.get("memory") else []),
             "", common.markdown_table(COLUMNS, table_rows(record["variants"], peak["tflops"])), "",
             common.markdown_table(RATIO_COLUMNS, ratio_rows(record["ratios"]), align="lrrlll"), "",
             "Ratios from the median step time (the headline) and from the best step time (what a "
             "step costs when nothing else competes for the host).", "",
             "Variants:", ""]
    lines += [f"- `{r['name']}`: {r['about']}" for r in record["variants"]]
    if record.get("notes"):
        lines += ["", *record["notes"]]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> StepRun:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (StepSettings, common.Rounds, common.RunSettings):
        common.add_fields(p, cls)
    a = p.parse_args(argv)
    try:
        settings = common.from_args(StepSettings, a)
    except ValueError as e:
        p.error(str(e))
    return StepRun(settings, common.from_args(common.Rounds, a), common.from_args(common.RunSettings, a))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parse_args(argv)
    st = cli.settings
    device, record = common.start_run("step", cli.run, argv)   # commit and time as the run starts
    s = Setup(st, device)
    for stage in st.zero_stage:                                  # what the trainer refuses, refused here too
        engine_lib.check_device(engine_lib.EngineConfig(zero_stage=stage, precision=s.precision.name),
                                s.precision.dtype, device)
    try:
        with common.world_of_one():
            peak = common.PeakFlops(device, cli.run.peak_tflops, s.precision.dtype)     # the variants' dtype
            common.print_flush(f"precision: {s.precision.name} ({s.precision.why})")
            common.print_flush(f"step benchmark on {device}: {s.student} family at "
                               f"{'/'.join(map(str, st.img_size))}px, batch {st.batch}")
            rows, run_peak = measure(s, cli.rounds, peak, on_round=lambda rows, done: common.write_partial(
                fill_record(record, cli, s, device, peak, rows, None, rounds_done=done), device, cli.run))
    finally:
        s.close()
    fill_record(record, cli, s, device, peak, rows, run_peak, rounds_done=cli.rounds.rounds)
    print_report(record)
    return common.save_record(record, markdown(record), chart, cli.run, device, "step")


def fill_record(record: Dict[str, Any], cli: StepRun, s: Setup, device: torch.device,
                peak: common.PeakFlops, rows: List[Dict[str, Any]], run_peak: Optional[Dict[str, Any]],
                rounds_done: int) -> Dict[str, Any]:
    """The record of the rows so far: complete once ``rounds_done`` is the rounds asked for."""
    st, rd = cli.settings, cli.rounds
    for r in rows:
        r["mfu"] = r["tflops_per_sec"] * 1e12 / peak.flops
    record.update(
        settings={"student": s.student, "distilled": s.distilled, "vit": s.vit, "model_kwargs": s.model_kwargs,
                  "batch": st.batch, "img_size": st.img_size[0] if len(st.img_size) == 1 else st.img_size,
                  "native_size": s.native_size, "classes": st.classes,
                  "zero_stage": st.zero_stage, "compile": st.compile, "compile_mode": st.compile_mode,
                  "teacher": st.teacher, "teacher_kwargs": s.teacher_kwargs, "teacher_format": st.teacher_format,
                  "mixing": st.mixing, "precision": s.precision.name, "precision_why": s.precision.why,
                  "ref_amp": reference_amp(st.ref_amp, device, s.precision.name),
                  "ds_config": json.dumps(st.ds_config) if st.ds_config else None,
                  "warmup": rd.warmup, "steps": rd.steps, "rewarm": rd.rewarm, "rounds": rd.rounds},
        peak=peak.record(),
        memory=run_peak or {},
        variants=rows,
        ratios=ratios(rows, st.zero_stage, patch=int(s.model_kwargs.get("patch_size", 16))),
    )
    record["rounds_done"] = rounds_done
    record["partial"] = rounds_done < rd.rounds
    if device.type != "cuda":
        record["notes"] = ["Peak memory per variant is GPU-only (n/a on CPU; the run's max RSS is above). "
                           f"Baseline B autocasts to the run's precision ({s.precision.name}) on CPU: "
                           "fp16 matmuls have no fast CPU path, so as published (fp16) it would measure emulation."]
    return record


def size_label(settings: Dict[str, Any]) -> str:
    size = settings["img_size"]
    return "/".join(map(str, size)) if isinstance(size, list) else str(size)


def print_report(record: Dict[str, Any]) -> None:
    common.print_flush("\n" + common.text_table(COLUMNS, table_rows(record["variants"], record["peak"]["tflops"])))
    common.print_flush(common.peak_memory_md(record["memory"]))
    if record["ratios"]:
        common.print_flush("\n" + common.text_table(RATIO_COLUMNS, ratio_rows(record["ratios"])))


def chart(record: Dict[str, Any], path: Path) -> Path:
    st = record["settings"]
    rows = record["variants"]
    hw = record["hardware"].get("gpu") or (f"CPU ({record['hardware']['cpu_cores']} cores, "
                                           f"{common.plural(record['hardware']['torch_threads'], 'torch thread')})")
    notes = [f"{record['date']} · {record['commit']} · {hw} · median of {rows[0]['steps_timed']} timed steps"]
    return common.bar_chart(
        [r["name"] for r in rows], [r["img_per_sec"] for r in rows], path,
        f"Training step, {common.model_label(st['student'], st['model_kwargs'])} at {size_label(st)}px, "
        f"batch {st['batch']}",
        highlight=[r["name"] for r in rows if r["kind"].startswith("fastdeit")], notes=notes)


if __name__ == "__main__":
    main()
