"""The demo teacher config through launch/train.py (one process, a few steps) in each precision:
MFU within (0, 100%], the start-up line, and the precision recorded and kept across a resume,
on this host and on an AVX2-only host imitated by capping oneDNN (ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2: an AMD EPYC without avx512_bf16).
"""
import json
import subprocess

import pytest
import yaml

from fastdeit.precision import cpu_bf16
from tests.launching import ROOT, command, env, records

pytestmark = pytest.mark.slow      # four launches of launch/train.py, one after the other

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from fastdeit.data.synthetic import generate

    root = tmp_path_factory.mktemp("demo-data")
    generate(str(root), classes=10, train_per_class=8, val_per_class=2, min_size=56, max_size=96, seed=0,
             quality=90)
    return root


def train(data, run, *overrides, extra_env=None):
    args = ["--config", "configs/demo_teacher.yaml", f"data.root={data}", f"trainer.run_dir={run}",
            "engine.global_batch_size=16", "optim.lr_base_batch=16", "data.num_threads=1",
            "logging.log_every=1", "logging.progress=lines", "checkpoint.resume=auto", *overrides]
    proc = subprocess.run(command("train.py", *args, ranks=1), cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def mfus(run, after_step=0):
    return [r["mfu"] for r in records(run, "step") if r["step"] > after_step]


def recorded(run):
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())
    return state["precision"]["engine"], yaml.safe_load((run / "config.yaml").read_text())["engine"]["precision"]


def test_demo_teacher_in_each_precision_mfu_and_resume(demo_data, tmp_path):
    # bf16, as set: native here (AMX/avx512_bf16) or emulated (warned about, with its cost).
    a = tmp_path / "a"
    out = train(demo_data, a, "engine.precision=bf16", "trainer.stop_after_steps=2")
    assert "precision: bf16 (set in the config)" in out
    assert ("bf16 is emulated" in out) is (not cpu_bf16().native)
    assert mfus(a) and all(0 < m <= 1 for m in mfus(a)), mfus(a)
    assert recorded(a) == ("bf16", "bf16")

    # The same run requeued on an AVX2-only host with auto: it stays bf16 (DeepSpeed resumes a
    # checkpoint only in its own precision), says why, and warns with the cost; MFU against the
    # fp32 units that emulated bf16 runs on.
    out = train(demo_data, a, "trainer.stop_after_steps=3", extra_env=AVX2)
    assert "resumed from" in out
    assert "precision: bf16 (auto: kept from the checkpoint, written in bf16, which DeepSpeed resumes only" in out
    assert "bf16 is emulated" in out and "measured (fp32 matmul, 1 thread: this CPU has" in out
    assert mfus(a, after_step=2) and all(0 < m <= 1 for m in mfus(a, after_step=2)), mfus(a)
    assert recorded(a) == ("bf16", "bf16")

    # A fresh auto run there: fp32, the reason on the start-up line.
    b = tmp_path / "b"
    out = train(demo_data, b, "trainer.stop_after_steps=2", extra_env=AVX2)
    assert "precision: fp32 (auto: this CPU has" in out and "bf16 is emulated" not in out
    assert all(0 < m <= 1 for m in mfus(b)), mfus(b)
    # Resumed here with auto: it stays fp32, whatever this host could do.
    out = train(demo_data, b, "trainer.stop_after_steps=4")
    assert "precision: fp32 (auto: kept from the checkpoint, written in fp32)" in out
    assert all(0 < m <= 1 for m in mfus(b)), mfus(b)
    summary_free = not (b / "summary.json").exists()      # stopped runs write no summary
    assert summary_free and recorded(b) == ("fp32", "fp32")
