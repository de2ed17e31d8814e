"""Every benchmark at tiny size for a few steps, so none of them can rot; the run report.

Structure and positivity only: the numbers of a 32-pixel model on a shared CPU say nothing.
The benchmarks run as subprocesses, exactly as documented (python -m benchmarks.<name>).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common
from fastdeit import precision as precision_lib
from fastdeit.distributed import free_port
from tests.childenv import child_env

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = '{"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What --precision auto (the default) picks on this CPU: bf16 where it is native, else fp32.
AUTO = precision_lib.resolve("auto", torch.device("cpu")).name


def run_module(module, *args, timeout=300):
    # DeepSpeed's accelerator follows --device: forcing the CPU under a cuda batch would move
    # the engine's module to the CPU (tests/childenv.py).
    args = list(map(str, args))
    cuda = "--device" in args and args[args.index("--device") + 1].startswith("cuda")
    env = child_env("cuda" if cuda else "cpu", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def the_record(out: Path, stem_end: str, dtype: str = AUTO):
    files = sorted(out.glob(f"*{stem_end}.json"))
    assert len(files) == 1, list(out.iterdir())
    record = json.loads(files[0].read_text())
    stem = files[0].with_suffix("")
    md = Path(f"{stem}.md").read_text()
    png = Path(f"{stem}.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    for key in ("date", "time", "commit", "command", "hardware", "software"):
        assert record[key], key
    assert record["hardware"]["device"] == "cpu" and record["hardware"]["cpu_cores"] >= 1
    assert files[0].name.startswith(record["date"] + "-cpu-")
    assert record["command"].startswith("python -m benchmarks.")
    assert record["peak"]["tflops"] > 0 and record["peak"]["dtype"] == dtype
    # The training runs' rule: a bf16 matmul, or the fp32 units where bf16 is emulated.
    assert record["peak"]["source"].startswith(("best of", "given", "datasheet")), record["peak"]
    return record, md


def positive(row, keys):
    for key in keys:
        assert row[key] > 0, (row["name"], key, row[key])


def test_step_benchmark(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro stays\n")
    proc = run_module(
        "benchmarks.step", "--model", "ti", "--model-kwargs", TINY_VIT, "--img-size", 32, "--batch", 4,
        "--classes", 5, "--teacher", "resnet10t", "--zero-stage", 0, 1, "--mixing",
        "--variants", "fastdeit", "fastdeit-student", "ds-defaults", "fastdeit-ema", "bare", "baseline-a", "baseline-b",
        "--warmup", 1, "--steps", 2, "--rounds", 2, "--out", tmp_path, "--name", "tiny", "--readme", readme)
    record, md = the_record(tmp_path, "-step-tiny")
    names = [v["name"] for v in record["variants"]]
    assert names == ["fastdeit[z0]", "fastdeit-student[z0]", "ds-defaults[z0]", "fastdeit-ema[z0]", "fastdeit[z1]",
                     "fastdeit-student[z1]", "ds-defaults[z1]", "fastdeit-ema[z1]", "bare-student", "A:vit-recipe",
                     "B:deit-reference"]
    for v in record["variants"]:
        positive(v, ["img_per_sec", "ms_per_step", "flops_per_image", "tflops_per_sec", "mfu"])
        assert v["steps_timed"] == 4                               # 2 rounds x 2 steps
        assert all(ms > 0 for ms in v["ms_phases"].values())
        assert v["peak_mem_gib"] is None                           # GPU-only figure
        assert v["img_per_sec"] == pytest.approx(4 / (v["ms_per_step"] / 1e3))
    # The run's peak on CPU: this process's max RSS (torch alone takes a few hundred MiB).
    assert record["memory"]["kind"] == "process max RSS" and 0.1 < record["memory"]["rss_gib"] < 64
    assert "process max RSS" in md and "process max RSS" in proc.stdout
    # Distillation adds the teacher's forward to the counted FLOPs.
    by = {v["name"]: v for v in record["variants"]}
    assert by["fastdeit[z1]"]["flops_per_image"] > by["fastdeit-student[z1]"]["flops_per_image"]
    assert by["B:deit-reference"]["flops_per_image"] == by["fastdeit[z1]"]["flops_per_image"]
    ratios = {r["name"]: r for r in record["ratios"]}
    assert {"overhead z0", "overhead z1", "speed-up vs A z1", "speed-up vs B z1", "teacher cost z1",
            "DS defaults z1", "EMA cost z0", "EMA cost z1"} <= set(ratios)
    assert all(r["value"] > 0 and r["value_best"] > 0 for r in ratios.values())
    assert ratios["overhead z1"]["target"] == "<= 1.10"
    # Printed and written tables; the README keeps its text and gains the marked table.
    assert "overhead z1" in proc.stdout and "B:deit-reference" in proc.stdout
    assert "| fastdeit[z1] |" in md and record["commit"] in md
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro stays\n") and "<!-- bench:step -->" in text
    assert "| fastdeit[z1] |" in text


@pytest.mark.slow
def test_step_benchmark_compiled_and_eager_in_one_run(tmp_path):
    """--compile both: each variant eager and compiled side by side, plus torch.compile before
    wrapping; the compiled ones are named +compile and get their own ratios."""
    run_module(
        "benchmarks.step", "--model", "ti", "--model-kwargs", TINY_VIT, "--img-size", 32, "--batch", 4,
        "--classes", 5, "--zero-stage", 1, "--compile", "both", "--variants", "fastdeit-student", "wrap-compiled",
        "--warmup", 1, "--steps", 2, "--rounds", 1, "--out", tmp_path, "--name", "compile", timeout=900)
    record, md = the_record(tmp_path, "-step-compile")
    assert [v["name"] for v in record["variants"]] == [
        "fastdeit-student[z1]", "fastdeit-student[z1]+compile", "wrap-compiled[z1]"]
    assert [v["compiled"] for v in record["variants"]] == [False, True, True]
    assert record["settings"]["compile"] == "both" and "compile both (default)" in md
    ratios = {r["name"] for r in record["ratios"]}
    assert {"compile speed-up z1", "engine.compile vs wrap z1"} <= ratios


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    from fastdeit.data.synthetic import generate

    root = tmp_path_factory.mktemp("jpegs")
    generate(str(root), classes=4, train_per_class=16, val_per_class=1, min_size=40, max_size=64, seed=0, quality=90)
    return root


def test_step_benchmark_in_fp32(tmp_path):
    """--precision fp32 (what auto picks on a CPU without native bf16): every variant computes in
    fp32, with no autocast in the plain loops and baseline B, and the MFU is against the fp32 peak."""
    proc = run_module(
        "benchmarks.step", "--model", "ti", "--model-kwargs", TINY_VIT, "--img-size", 32, "--batch", 4,
        "--classes", 5, "--teacher", "resnet10t", "--zero-stage", 1, "--precision", "fp32",
        "--variants", "fastdeit", "bare", "baseline-a", "baseline-b",
        "--warmup", 1, "--steps", 1, "--rounds", 1, "--out", tmp_path, "--name", "fp32")
    record, md = the_record(tmp_path, "-step-fp32", dtype="fp32")
    assert record["settings"]["precision"] == "fp32" and record["settings"]["ref_amp"] == "fp32"
    assert [v["compute_dtype"] for v in record["variants"]] == ["fp32"] * 4
    about = {v["name"]: v["about"] for v in record["variants"]}
    assert "ZeRO-1 fp32, distilled student + frozen fp32" in about["fastdeit[z1]"]
    assert "autocast" not in about["bare-student"] + about["A:vit-recipe"] + about["B:deit-reference"]
    assert all(0 < v["mfu"] <= 1 for v in record["variants"])
    assert "precision: fp32 (given with --precision)" in proc.stdout


def test_step_benchmark_several_sizes(tmp_path):
    """--img-size with several sides (data.size_schedule): every variant at each side in one
    run, students at the native (largest) side, ratios against the token and FLOP ratios."""
    run_module("benchmarks.step", "--model", "ti", "--model-kwargs", TINY_VIT, "--img-size", 32, 48,
               "--batch", 4, "--classes", 5, "--zero-stage", 1, "--variants", "fastdeit-student",
               "--warmup", 1, "--steps", 1, "--rounds", 1, "--out", tmp_path, "--name", "sizes")
    record, md = the_record(tmp_path, "-step-sizes")
    assert [v["name"] for v in record["variants"]] == ["fastdeit-student[z1]@32", "fastdeit-student[z1]@48"]
    assert record["settings"]["img_size"] == [32, 48] and record["settings"]["native_size"] == 48
    small, big = record["variants"]
    assert small["flops_per_image"] < big["flops_per_image"]
    (ratio,) = [r for r in record["ratios"] if r["name"] == "fastdeit-student[z1] 48->32"]
    assert ratio["token_ratio"] == (48 // 8) ** 2 / (32 // 8) ** 2
    assert ratio["flops_ratio"] == pytest.approx(big["flops_per_image"] / small["flops_per_image"])
    assert "32/48px" in md


def test_e2e_benchmark(tmp_path, jpeg_tree):
    """Distilled (the GPU suite's headline): fastdeit's distilled step against the DeiT reference
    step, each behind its loader, timed in steady state only."""
    proc = run_module(
        "benchmarks.e2e", "--data", jpeg_tree, "--model", "ti", "--model-kwargs", TINY_VIT, "--img-size", 32,
        "--teacher", "resnet10t", "--batch", 8, "--workers", 1, "--warmup", 2, "--steps", 5, "--rounds", 2,
        "--rewarm", 1, "--out", tmp_path)
    record, md = the_record(tmp_path, "-e2e")
    assert [s["name"] for s in record["sides"]] == ["fastdeit", "baseline"]
    # 64 images, batch 8: 8 batches per epoch on both sides. Warm-up 2 leaves 6; round 1 takes
    # 1 untimed + 5 timed (the epoch ends); round 2 would cross the boundary, so the next epoch's
    # first batch is its untimed step and 5 timed follow: 10 timed steps, one boundary, untimed.
    for side in record["sides"]:
        positive(side, ["img_per_sec", "ms_per_step", "wall_s", "flops_per_image", "mfu", "boundary_wait_ms"])
        assert side["images"] == 80 and side["steps_timed"] == 10 and 0.0 <= side["data_wait"] <= 1.0
        assert (side["batches_per_epoch"], side["epochs_seen"], side["boundaries"]) == (8, 2, 1)
        assert side["distilled"] is True and side["compute_dtype"] == AUTO
    fastdeit, baseline = record["sides"]
    # Both sides count the same FLOPs: the distilled student's training step plus the teacher's forward.
    assert fastdeit["flops_per_image"] == pytest.approx(baseline["flops_per_image"], rel=1e-6)
    assert "resnet10t teacher" in fastdeit["about"] and "DeiT reference step" in baseline["about"]
    assert record["settings"]["train_images"] == 64 and record["settings"]["classes"] == 4
    assert record["partial"] is False and record["rounds_done"] == 2
    assert record["ratios"][0]["name"] == "speed-up" and record["ratios"][0]["value"] > 0
    assert "| fastdeit |" in md and "speed-up" in proc.stdout and "distilled (teacher resnet10t)" in md
    assert "- epoch boundary, fastdeit: " in md and "- epoch boundary, baseline: " in proc.stdout


def test_readme_splice_replaces_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n")
    common.update_readme(readme, "step", "table one")
    common.update_readme(readme, "e2e", "e2e table")
    common.update_readme(readme, "step", "table two")
    text = readme.read_text()
    assert text.count("<!-- bench:step -->") == 1 and "table two" in text and "table one" not in text
    assert text.startswith("# Title\n\nbefore\n") and "e2e table" in text


def test_statistics_and_cpu_clock():
    s = common.summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s["median"] == 3.0 and s["n"] == 5 and s["p25"] <= s["median"] <= s["p75"]
    clock = common.PhaseClock(torch.device("cpu"))
    a = clock.mark()
    b = clock.mark()
    assert clock.elapsed_ms(a, b) >= 0
    assert common.MemoryProbe(torch.device("cpu")).start() is None   # CPU: peak memory unknown
    # The run's CPU peak is the process's high-water mark, as the kernel reports it.
    rss = common.MemoryProbe(torch.device("cpu")).run_peak()["rss_gib"] * 2**30
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert rss == pytest.approx(hwm_kib * 1024, rel=0.05)
    assert common.hardware_tag(torch.device("cpu")) == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_benchmark_gpu_timing_and_memory(tmp_path):
    run_module("benchmarks.step", "--model", "ti", "--img-size", 224, "--batch", 32, "--teacher", "resnet50",
               "--zero-stage", 1, "--warmup", 2, "--steps", 5, "--rounds", 2, "--out", tmp_path, "--device", "cuda")
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["hardware"]["gpu"]
    for v in record["variants"]:
        assert v["peak_mem_gib"] > 0 and v["img_per_sec"] > 0
    # The whole run's device peak holds every variant's own peak.
    assert record["memory"]["kind"] == "device"
    assert record["memory"]["allocated_gib"] >= max(v["peak_mem_gib"] for v in record["variants"]) * 0.999
    assert record["memory"]["reserved_gib"] >= record["memory"]["allocated_gib"]


def test_finetune_record_pairs_seeds_and_says_what_was_loaded():
    """benchmarks/finetune.py's summary: the gain is per seed (fine-tune minus scratch of the same
    seed), and the record quotes the fine-tune's load line."""
    from benchmarks import finetune

    rows = [dict(variant=v, seed=s, top1=t, top5=100.0, wall_s=10.0, val_images=240,
                 init_log="model.init_weights for x: 1 tensors loaded" if v == "finetune" else None)
            for s, (a, b) in enumerate(((96.0, 75.0), (97.5, 74.0), (95.0, 76.0))) for v, t in (("finetune", a), ("scratch", b))]
    summary = finetune.summarize(rows)
    assert summary["finetune"]["top1"] == pytest.approx(96.1666666)
    assert summary["gain"] == pytest.approx({"mean": (21 + 23.5 + 19) / 3, "min": 19.0, "max": 23.5})
    record = {"runs": rows, "summary": summary, "time": "t", "commit": "c", "command": "python -m benchmarks.finetune",
              "hardware": {"cpu": "cpu", "cpu_cores": 2, "torch_threads": 2},
              "software": {k: "v" for k in ("torch", "timm", "deepspeed", "dali", "python")},
              "settings": {"pretrained": "p", "pretrain": None, "task_root": "data/t", "task": finetune.TASK,
                           "epochs": 15, "student_only": finetune.STUDENT_ONLY, "recipe": finetune.RECIPE}}
    text = finetune.markdown(record)
    assert "| finetune | 96.2 (1.3) |" in text and "+21.2 points on average (from +19.0 to +23.5)" in text
    assert "`model.init_weights for x: 1 tensors loaded`" in text


@pytest.fixture(scope="module")
def world():
    from fastdeit import distributed

    env = distributed.init()
    yield env
    distributed.teardown()


@pytest.mark.slow
def test_fastdeit_variant_runs_the_trainers_step(world, jpeg_tree, tmp_path):
    """The step benchmark's fastdeit variant (distilled, Mixup/CutMix + erasing, EMA, ZeRO-1
    bf16) and a real run built by build_trainer execute the same code: same initial weights,
    the same loss bit for bit at every step when fed the trainer's batches with the generator
    states the trainer had, and the same weights and EMA at the end."""
    import dataclasses

    import numpy as np

    from benchmarks.variants import FastdeitStep, Setup, StepSettings
    from fastdeit.build import build_trainer, seed_everything
    from fastdeit.config import load_config
    from tests.launching import TINY

    s = Setup(StepSettings(model="ti", model_kwargs=json.loads(TINY_VIT), batch=8, img_size=[32], classes=4,
                           teacher="resnet10t", mixing=True), torch.device("cpu"))
    try:
        # The step's sections are the benchmark's; the run's (data folder, run dir, logging) a tiny run's.
        bench = s.fastdeit_config(1, distill=True, ema=True)
        run = load_config(None, [*TINY, f"data.root={jpeg_tree}", f"trainer.run_dir={tmp_path}", "logging.log_every=3"])
        cfg = dataclasses.replace(
            bench, data=dataclasses.replace(run.data, img_size=bench.data.img_size),
            trainer=dataclasses.replace(run.trainer, epochs=bench.trainer.epochs),
            logging=run.logging, checkpoint=run.checkpoint, runtime=run.runtime)
        trainer = build_trainer(cfg, world)
        start = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
        fed = []
        forward = trainer.train_step.forward

        def recorded(images, labels):
            fed.append([images.clone(), labels.clone(), torch.get_rng_state(), np.random.get_state()])
            loss = forward(images, labels)
            fed[-1].append(loss.detach().clone())
            return loss

        trainer.train_step.forward = recorded
        trainer.train_epoch(0)
        trainer.train_loader.close()
        assert len(fed) == trainer.steps_per_epoch == 8

        seed_everything(cfg.trainer.seed, 0)           # as build_trainer seeds before building
        v = FastdeitStep(s, 1, distill=True, ema=True, steps_per_epoch=trainer.steps_per_epoch)
        assert v.name == "fastdeit[z1]" and v.cfg.ema.decay == 0.99996 and v.step.parts.teacher is not None
        got = v.engine.module.state_dict()
        assert all(torch.equal(got[k], t) for k, t in start.items())
        for images, labels, torch_rng, numpy_rng, loss in fed:
            torch.set_rng_state(torch_rng)
            np.random.set_state(numpy_rng)
            v(images.clone(), labels)
            assert torch.equal(v.step.loss, loss)
        assert len({round(float(x[-1]), 6) for x in fed}) > 1          # the steps did differ
        for a, b in ((trainer.engine.module.state_dict(), v.engine.module.state_dict()),
                     (trainer.ema.state_dict(), v.step.parts.ema.state_dict())):
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        s.close()
