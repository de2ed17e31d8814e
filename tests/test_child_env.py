"""The environment every test child gets (tests/childenv.py): the parent's PYTHONPATH kept (on
the GPU host DALI and DeepSpeed are only reachable through it), DeepSpeed's CPU accelerator
forced only for children that run on the CPU."""
import ast
import os
import subprocess
from pathlib import Path

import pytest

from tests import childenv
from tests.childenv import ROOT, child_env

TESTS = ROOT / "tests"
# The GPU host as the suite runs `pytest -m gpu` there, under `make test`'s forced CPU accelerator
# (the worst case a GPU child can inherit).
HOST = {"PYTHONPATH": "/host/fastdeit/.devsite", "DS_ACCELERATOR": "cpu", "PATH": os.environ.get("PATH", "")}


def test_child_env_extends_and_never_replaces():
    env = child_env("cpu", environ=HOST, OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/host/fastdeit/.devsite"]
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1" and env["PATH"] == HOST["PATH"]
    assert child_env("cuda", environ=HOST)["DS_ACCELERATOR"] == "cuda"       # not the parent's cpu
    assert child_env(None, environ=HOST)["DS_ACCELERATOR"] == "cpu"          # left as it was
    assert "DS_ACCELERATOR" not in child_env(None, environ={})
    first = child_env(None, path_first=["/x"], environ={"PYTHONPATH": f"/x{os.pathsep}{ROOT}"})["PYTHONPATH"]
    assert first.split(os.pathsep) == ["/x", str(ROOT)]                     # no duplicates
    with pytest.raises(ValueError, match="PYTHONPATH"):
        child_env("cpu", PYTHONPATH=str(ROOT))
    with pytest.raises(ValueError, match="accelerator"):
        child_env("gpu")


class _Started(Exception):
    pass


def _children(monkeypatch, call):
    """The environments of the processes ``call`` starts (none is run: the first start raises)."""
    seen = []

    def record(*args, env=None, **kwargs):
        seen.append(dict(os.environ) if env is None else env)
        raise _Started

    monkeypatch.setattr(os, "environ", dict(HOST))
    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.setattr(subprocess, "Popen", record)
    with pytest.raises(_Started):
        call()
    return seen


def _gpu_children(tmp_path):
    from tests import test_benchmarks, test_host_copies

    return {
        "test_host_copies::test_twenty_training_steps_without_a_host_sync":
            lambda: test_host_copies.test_twenty_training_steps_without_a_host_sync(tmp_path),
        "test_benchmarks::test_step_benchmark_gpu_timing_and_memory":
            lambda: test_benchmarks.test_step_benchmark_gpu_timing_and_memory(tmp_path),
    }


def test_gpu_test_children_keep_the_path_and_get_cuda(monkeypatch, tmp_path):
    """Each GPU-marked test that starts a child, run here with the start intercepted."""
    for name, call in _gpu_children(tmp_path).items():
        (env,) = _children(monkeypatch, call)
        assert "/host/fastdeit/.devsite" in env["PYTHONPATH"].split(os.pathsep), name
        assert env.get("DS_ACCELERATOR") != "cpu", name


def test_cpu_test_children_keep_the_path():
    from tests import launching

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", dict(HOST))
        env = launching.env()
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == "/host/fastdeit/.devsite" and env["DS_ACCELERATOR"] == "cpu"


def _marked_gpu(fn: ast.FunctionDef) -> bool:
    return any("gpu" in ast.unparse(d) and "mark" in ast.unparse(d) for d in fn.decorator_list)


STARTERS = {"run", "Popen", "run_module", "launch", "check_output", "call", "run_suite"}


def test_no_test_builds_a_child_environment_by_hand():
    """Everywhere in tests/: no PYTHONPATH or DS_ACCELERATOR set on a copy of os.environ outside
    tests/childenv.py, and every GPU-marked test that starts a process is among those checked above."""
    checked = {name.split("::")[1] for name in _gpu_children(Path("."))}
    by_hand, unchecked = [], []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("childenv.py", Path(__file__).name):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "dict" and node.args \
                    and "environ" in ast.unparse(node.args[0]):
                keys = {k.arg for k in node.keywords}
                if keys & {"PYTHONPATH", "DS_ACCELERATOR"}:
                    by_hand.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.FunctionDef) and _marked_gpu(node) and node.name not in checked:
                calls = {(c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", ""))
                         for c in ast.walk(node) if isinstance(c, ast.Call)}
                if calls & STARTERS:
                    unchecked.append(f"{path.name}::{node.name}")
    assert by_hand == [], f"build these with tests.childenv.child_env: {by_hand}"
    assert unchecked == [], f"GPU tests that start a child: add them to _gpu_children: {unchecked}"
    assert childenv.__doc__
