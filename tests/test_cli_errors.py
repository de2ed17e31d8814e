"""One-line errors: the entry points print a FastDeitError as `fastdeit: error: ...` (rank 0
only under a launcher, unless only one rank can meet it) and exit 2; anything else keeps its
traceback."""
import subprocess

import pytest

from fastdeit.cli import reported
from fastdeit.errors import BadImageError, ConfigError
from tests.launching import ROOT, TINY, command, env, release_shm


def run(script, *args, ranks=1):
    # deepspeed's launcher: it passes a rank's exit status 2 through (torchrun reports 1).
    cmd = command(script, *args, ranks=ranks, launcher="deepspeed")
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env(ranks), capture_output=True, text=True, timeout=600)
    finally:
        release_shm(cmd)


def error_lines(proc):
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "fastdeit: error:" in line]


def assert_one_line(proc, *fragments):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("fastdeit: error: "), out[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in out, out[-3000:]
    return lines[0]


def test_config_mistake(tmp_path):
    proc = run("train.py", "--config", "configs/deit_ti.yaml", "optim.lrr=1", f"trainer.run_dir={tmp_path}")
    assert_one_line(proc, "configs/deit_ti.yaml", "unknown key 'optim.lrr' (did you mean 'lr'?)")
    proc = run("train.py", "--config", str(tmp_path / "missing.yaml"))
    assert_one_line(proc, f"config file {tmp_path / 'missing.yaml'} does not exist")


def test_data_folder_mistake(tmp_path):
    proc = run("train.py", *TINY, f"data.root={tmp_path / 'nowhere'}", f"trainer.run_dir={tmp_path / 'run'}",
               "model.name=deit_tiny_patch16_224", "distill.type=none")
    assert_one_line(proc, f"image folder does not exist or is not a directory: {tmp_path / 'nowhere' / 'train'}")


def test_weights_mistake(dataset, tmp_path):
    proc = run("eval.py", "--config", "configs/deit_ti.yaml", "--weights", str(tmp_path / "nope.pth"),
               *TINY, f"data.root={dataset}", "model.name=deit_tiny_patch16_224", "--out", str(tmp_path / "e.json"))
    assert_one_line(proc, f"weights file {tmp_path / 'nope.pth'} does not exist")


def test_checkpoint_mistakes(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    proc = run("export.py", str(tmp_path))
    assert_one_line(proc, f"{tmp_path}: no trainer_state.json; not a complete fastdeit checkpoint")
    (tmp_path / "checkpoints").mkdir()
    proc = run("export.py", str(tmp_path), "--best")
    assert_one_line(proc, "no 'best' checkpoint recorded")


@pytest.mark.slow
def test_under_the_launcher_rank_0_alone_reports(dataset, tmp_path):
    # Everything builds on both ranks, then the resume path is wrong on both.
    proc = run("train.py", *TINY, f"data.root={dataset}", f"trainer.run_dir={tmp_path / 'run'}",
               "model.name=deit_tiny_patch16_224", "distill.type=none",
               f"checkpoint.resume={tmp_path / 'old'}", ranks=2)
    assert_one_line(proc, f"checkpoint.resume={tmp_path / 'old'}: not a run, checkpoints or checkpoint folder")


def test_unexpected_errors_keep_their_traceback(dataset):
    # Not a mistake we anticipate (nothing can be written under /proc): a bug or the
    # environment, so the full traceback matters.
    proc = run("train.py", *TINY, f"data.root={dataset}", "trainer.run_dir=/proc/fastdeit-run",
               "model.name=deit_tiny_patch16_224", "distill.type=none")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and not error_lines(proc), proc.stderr[-3000:]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_rank_filter(monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for error, shown in ((ConfigError("a\n  b"), rank == "0"), (BadImageError("x.jpg"), True)):
        with pytest.raises(SystemExit) as exit_:
            with reported():
                raise error
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err == (f"fastdeit: error: {'a b' if isinstance(error, ConfigError) else 'x.jpg'}\n" if shown else "")
    with pytest.raises(KeyError):       # others pass through untouched
        with reported():
            raise KeyError("k")
