"""benchmarks/infer.py: the CLI writes its record and the Figure-1 chart, every model gets a
positive throughput, and the cited top-1 table covers every model it can measure.

The run is tiny (three models at 32 px, batch 2, ~0.2 s of timing each, eager): its numbers say
nothing, only that the pipeline from timm model to record and figure holds.
"""
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import infer
from tests.childenv import child_env

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The DeiT paper's ImageNet top-1 of its own models (docs/DESIGN.md "results" row, taken from the
# paper's results table and the reference README's model zoo): the specs must quote the same.
DEIT_TOP1 = {"deit_tiny_patch16_224": 72.2, "deit_small_patch16_224": 79.8, "deit_base_patch16_224": 81.8,
             "deit_base_patch16_384": 83.1, "deit_tiny_distilled_patch16_224": 74.5,
             "deit_small_distilled_patch16_224": 81.2, "deit_base_distilled_patch16_224": 83.4}


def test_cited_top1_table_covers_every_model():
    import timm

    asked = {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
             "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
             "deit_base_distilled_patch16_224", "deit_base_patch16_384", "deit_base_distilled_patch16_384",
             "vit_base_patch16_384", "vit_large_patch16_384", "resnet50", "regnety_040", "regnety_080",
             "regnety_160", *(f"efficientnet_b{i}" for i in range(8))}
    assert set(infer.BY_NAME) == asked and len(infer.SPECS) == len(asked)
    for spec in infer.SPECS:
        assert timm.is_model(spec.name), spec.name
        assert 60 < spec.top1 < 90 and spec.paper_img_s > 0, spec
        assert "2012.12877" in spec.source and "Table 5" in spec.source, spec
        assert spec.family in infer.FAMILY_STYLE
    for name, top1 in DEIT_TOP1.items():
        assert infer.BY_NAME[name].top1 == top1
    # EfficientNet-B0..B7 at Tan & Le's resolutions, the image sizes of the DeiT paper's Table 5.
    assert [infer.BY_NAME[f"efficientnet_b{i}"].img_size for i in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert [s.name for s in infer.select(None, quick=True)] == infer.QUICK
    assert [s.name for s in infer.select(["deit_small"], quick=False)] == [
        "deit_small_patch16_224", "deit_small_distilled_patch16_224"]


def test_cli_writes_record_and_figure(tmp_path):
    models = ["deit_tiny_patch16_224", "resnet50", "efficientnet_b0"]
    cmd = [sys.executable, "-m", "benchmarks.infer", "--models", *models, "--img-size", "32", "--batch-cap", "2",
           "--compile", "off", "--warmup", "1", "--seconds", "0.2", "--threads", "1", "--precision", "fp32",
           "--out", str(tmp_path), "--name", "t"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env("cpu", PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-cpu-infer-t.json")
    record = json.loads(path.read_text())
    assert record["partial"] is False and record["precision"]["name"] == "fp32"
    assert [r["name"] for r in record["rows"]] == models
    for row in record["rows"]:
        assert row["img_per_sec"] > 0 and row["batch"] == 2 and row["side"] == "eager"
        # img/s is batch x iterations over the timed span.
        assert abs(row["img_per_sec"] - 2 * row["iters"] / row["timed_s"]) < 1e-6 * row["img_per_sec"]
        assert row["channels_last"] == (row["name"] != "deit_tiny_patch16_224")
        assert row["top1"] == infer.BY_NAME[row["name"]].top1 and row["gflops_per_image"] > 0
    assert set(record["top1_table"]) == set(models)
    ref = {r["name"]: r for r in record["ratios"] if r["kind"] == "vs_reference"}
    assert ref["resnet50"]["ours"] == 1.0 and abs(ref["deit_tiny_patch16_224"]["paper"] - 2536.5 / 1226.1) < 1e-9
    md = path.with_suffix(".md").read_text()
    assert "| DeiT-Ti | 32 | 2 | fp32 |" in md and "| ResNet-50 | 32 | 2 | fp32, NHWC |" in md
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_compiled_side_beside_eager(tmp_path, monkeypatch):
    """--compile both: each model eager, then through torch.compile at the same batch, with the
    compile speed-up, the table's compiled column and the figure drawn from the faster side.
    torch.compile runs with dynamo's eager backend here (the rows, ratios and record of the
    compiled side, without inductor's C++ build); inductor's own speed-up on this CPU is a
    record in benchmarks/results (python -m benchmarks.infer --compile both)."""
    import pytest
    import torch

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    try:
        record = infer.main(["--models", "deit_tiny_patch16_224", "--img-size", "32", "--batch-cap", "2",
                             "--compile", "both", "--warmup", "1", "--seconds", "0.1", "--precision", "fp32",
                             "--out", str(tmp_path), "--name", "c"])
    finally:
        torch._dynamo.reset()
    eager, compiled = record["rows"]
    assert (eager["side"], compiled["side"]) == ("eager", "compiled") and compiled["batch"] == eager["batch"] == 2
    assert compiled["first_call_s"] > 0 and compiled["img_per_sec"] > 0
    (speedup,) = [r for r in record["ratios"] if r["kind"] == "compile_speedup"]
    assert speedup["ours"] == pytest.approx(compiled["img_per_sec"] / eager["img_per_sec"])
    md = Path(record["files"]["md"]).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| DeiT-Ti |"))
    assert f"| {infer.common.fmt(compiled['img_per_sec'])} |" in row and f"{speedup['ours']:.2f}x" in row
    assert Path(record["files"]["png"]).read_bytes().startswith(PNG_MAGIC)
