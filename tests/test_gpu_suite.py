"""benchmarks/gpu_suite.sh runs end to end here (--dry-run: CPU, tiny sizes), so a broken line
is found before the few minutes on the GPU host; its table and budget are checked too."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import suite_summary

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["versions", "pytest_gpu", "jpegs", "step", "memory_step", "memory_pipeline", "data", "e2e",
          "memory_pipeline_noprealloc"]


def run_suite(tmp_path, *args, budget=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "OUT")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    if budget is not None:
        env["SUITE_BUDGET"] = str(budget)
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def records(out: Path):
    with tarfile.open(out / "records.tar.gz") as tar:
        names = tar.getnames()
        stages = tar.extractfile("records/stages.tsv").read().decode()
    return names, [line.split("\t") for line in stages.splitlines()]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = run_suite(tmp_path, out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # What the device tool brings back: three files, none deeper.
    assert sorted(p.name for p in out.iterdir()) == ["records.tar.gz", "suite.log", "summary.md"]
    names, stages = records(out)
    assert [s[0] for s in stages] == STAGES and all(s[1] == "ok" for s in stages), stages
    for pattern in ("records/pytest_gpu.xml", "records/memory-step.json", "records/memory-pipeline.json",
                    "records/memory-pipeline-noprealloc.json", "records/data.json", "-step-suite.json",
                    "-e2e-suite.json", "records/versions.log"):
        assert any(n.endswith(pattern) for n in names), (pattern, names)
    summary = (out / "summary.md").read_text()
    # The table comes last in the output, and holds every measurement.
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    for row in ("pytest -m gpu: 0 passed, 0 failed, 0 errors", "| step fastdeit[z1] |", "| step bare-student |",
                "memory: train pipeline (preallocated)", "memory: train pipeline (no prealloc)",
                "| data path: fastdeit / reference loader |", "| e2e fastdeit |", "| e2e ratio: speed-up |",
                "step, batch 4 |", "| step MFU peak |", "| e2e MFU peak |"):
        assert row in summary, (row, summary)
    assert "torch" in (out / "suite.log").read_text() and "nvidia-smi: not found" in (out / "suite.log").read_text()


def test_budget_skips_what_does_not_fit(tmp_path):
    """With no time left every stage is skipped, recorded as such, and the table still comes out."""
    out = tmp_path / "out"
    proc = run_suite(tmp_path, out, budget=5, timeout=300)
    assert proc.returncode == 1
    _, stages = records(out)
    assert {s[0]: s[1] for s in stages if s[0] != "jpegs"} == {s: "skipped" for s in STAGES if s != "jpegs"}
    assert "pytest -m gpu: no record" in (out / "summary.md").read_text()


def test_summary_of_nothing(tmp_path):
    text = suite_summary.table(tmp_path)
    assert text.startswith("## GPU suite") and "pytest -m gpu: no record" in text
