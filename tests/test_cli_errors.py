"""One-line errors: the entry points print a FastDeitError as `fastdeit: error: ...` (rank 0
only under a launcher, unless only one rank can meet it) and exit 2; anything else keeps its
traceback.

The single-process mistakes run through the scripts as `__main__` in one child interpreter
(`mistakes`: ~5 s of imports once instead of once per mistake); the launcher's and the
interpreter's own exit paths (a traceback, status 1) keep a process each."""
import json
import subprocess
import sys
from typing import NamedTuple

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


class Ran(NamedTuple):
    """What one entry-point call left: as subprocess.CompletedProcess has it."""
    returncode: int
    stdout: str
    stderr: str


# Each case: launch/<script> run as __main__ with these arguments, its exit status the
# SystemExit it raised (as the interpreter would turn it into one), its output captured.
DRIVER = r"""
import contextlib, io, json, runpy, sys
cases, out_file = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for name, (script, args) in cases.items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results[name] = [code, out.getvalue(), err.getvalue()]
with open(out_file, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def mistakes(dataset, tmp_path_factory):
    """{case: Ran} for every single-process mistake, from one child interpreter."""
    tmp = tmp_path_factory.mktemp("mistakes")
    run_dir = tmp / "notarun"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    nocheckpoints = tmp / "nocheckpoints"
    (nocheckpoints / "checkpoints").mkdir(parents=True)
    (nocheckpoints / "config.yaml").write_text("{}\n")
    cases = {
        "unknown key": ("train.py", ["--config", "configs/deit_ti.yaml", "optim.lrr=1", f"trainer.run_dir={tmp}"]),
        "missing config": ("train.py", ["--config", str(tmp / "missing.yaml")]),
        "missing data": ("train.py", [*TINY, f"data.root={tmp / 'nowhere'}", f"trainer.run_dir={tmp / 'run'}",
                                      "model.name=deit_tiny_patch16_224", "distill.type=none"]),
        # Refused before the data is looked at (the folder does not exist either).
        "lamb at zero 3": ("train.py", [*TINY, f"data.root={tmp / 'nowhere'}", f"trainer.run_dir={tmp / 'run3'}",
                                        "model.name=deit_tiny_patch16_224", "distill.type=none", "optim.name=lamb",
                                        "engine.zero_stage=3"]),
        "missing weights": ("eval.py", ["--config", "configs/deit_ti.yaml", "--weights", str(tmp / "nope.pth"),
                                        *TINY, f"data.root={dataset}", "model.name=deit_tiny_patch16_224",
                                        "--out", str(tmp / "e.json")]),
        "not a checkpoint": ("export.py", [str(run_dir)]),
        "no best": ("export.py", [str(nocheckpoints), "--best"]),
    }
    cases = {k: (str(ROOT / "launch" / script), args) for k, (script, args) in cases.items()}
    out_file = tmp / "results.json"
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), str(out_file)], cwd=ROOT, env=env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, **{k: Ran(*v) for k, v in json.loads(out_file.read_text()).items()}}


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


def test_config_mistake(mistakes):
    assert_one_line(mistakes["unknown key"], "configs/deit_ti.yaml", "unknown key 'optim.lrr' (did you mean 'lr'?)")
    missing = mistakes["tmp"] / "missing.yaml"
    assert_one_line(mistakes["missing config"], f"config file {missing} does not exist")


def test_data_folder_mistake(mistakes):
    nowhere = mistakes["tmp"] / "nowhere"
    assert_one_line(mistakes["missing data"], f"image folder does not exist or is not a directory: {nowhere / 'train'}")


def test_optimizer_the_zero_stage_cannot_shard(mistakes):
    assert_one_line(mistakes["lamb at zero 3"], "optim.name=lamb with engine.zero_stage=3", "engine.zero_stage=2")


def test_weights_mistake(mistakes):
    assert_one_line(mistakes["missing weights"], f"weights file {mistakes['tmp'] / 'nope.pth'} does not exist")


def test_checkpoint_mistakes(mistakes):
    assert_one_line(mistakes["not a checkpoint"],
                    f"{mistakes['tmp'] / 'notarun'}: no trainer_state.json; not a complete fastdeit checkpoint")
    assert_one_line(mistakes["no best"], "no 'best' checkpoint recorded")


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
