"""The sbatch templates on a real SLURM (tests/slurm_cluster.py), submitted as a user would from
a fresh checkout: no logs/ folder, no .venv, the templates' GPU request overridden on the
sbatch command line (as the README says for CPU nodes).

Each job trains the tiny DeiT of tests/launching.py on 2 CPU tasks under srun.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import ROOT, TINY
from tests.slurm_cluster import slurm  # noqa: F401  (the session's cluster fixture)

pytestmark = pytest.mark.slurm

# CPU nodes: no GPUs, two tasks of one core (the templates ask for 8 GPUs and 8 x 12 cores).
CPU_REQUEST = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"]
STEPS_PER_EPOCH = 192 // 32          # the `dataset` fixture: 4 classes x 48 train images


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the repository as a fresh clone has it: the tracked (and new, not ignored)
    files only, so no logs/, runs/, data/ or .venv."""
    dest = tmp_path_factory.mktemp("clone")
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: copy the sources
        names = [str(p.relative_to(ROOT)) for d in ("launch", "fastdeit", "configs")
                 for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert not (dest / "logs").exists()
    return dest


def job_env(slurm):  # noqa: F811
    # sbatch exports the submitting environment to the job: the interpreter to run (a fresh
    # clone has no .venv) and DeepSpeed's CPU accelerator.
    return dict(slurm.env, PYTHON=sys.executable, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")


def overrides(dataset, run_dir, *extra):
    return ["configs/deit_ti.yaml", *TINY, f"data.root={dataset}", f"trainer.run_dir={run_dir}",
            "model.name=deit_tiny_patch16_224", "distill.type=none", *extra]


def job_log(checkout, job_id) -> str:
    path = checkout / f"fastdeit-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"


def epochs_of(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def submit(slurm, checkout, template, dataset, run_dir, *extra, request=CPU_REQUEST):  # noqa: F811
    return slurm.sbatch([*request, f"launch/slurm/{template}", *overrides(dataset, run_dir, *extra)],
                        cwd=checkout, env=job_env(slurm))


def assert_completed(slurm, checkout, job, info):  # noqa: F811
    log = job_log(checkout, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info}\n--- job log\n{log}\n--- daemons\n{slurm.logs()}"
    return log


def test_single_node_template_trains_through_usr2_requeue_to_completion(slurm, checkout, dataset,  # noqa: F811
                                                                         tmp_path):
    """From a fresh clone: scancel --signal=USR2 (what the templates' --signal=USR2@300 does before the time
    limit) -> every rank stops at the next logging step with a checkpoint and exits 75 -> the
    template requeues the job -> the requeued job resumes from the run dir and trains to
    completion, appending to the same log. (One job for both stories: each start costs
    ~15 s of imports, and this test's second run is an ordinary run to completion.)"""
    run = tmp_path / "run"
    epochs = 8
    job = submit(slurm, checkout, "single_node.sbatch", dataset, run, f"trainer.epochs={epochs}",
                 "trainer.eval_every=0", f"checkpoint.every_epochs={epochs}")
    # The signal goes out as soon as every rank holds its stop-signal watch (installed before the
    # rendezvous that rank 0's "process group:" line follows), so it lands before the first step
    # whatever the machine's speed: the tiny run trains its 8 epochs in about a second, and a
    # signal timed by the log could land after training (then nothing is stopped or requeued).
    slurm.wait_for(job, lambda j: "process group:" in job_log(checkout, job), timeout=240,
                   what="the process group (every rank watching for stop signals)")
    slurm.run(["scancel", "--signal=USR2", str(job)])
    log_file = run / "log.jsonl"

    # The body requeues on exit 75; SLURM then holds the job for ~2 minutes (BeginTime) unless
    # released, which a test needn't wait for.
    slurm.wait_for(job, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", timeout=120,
                   what="the requeue after exit 75")
    slurm.release(job)
    info = slurm.wait_done(job, timeout=300)
    log = assert_completed(slurm, checkout, job, info)
    assert info["Restarts"] == "1"
    # The output landed in the submit folder, named by the template (a fresh clone has no logs/).
    assert f"world 2 (master {slurm.node}:{20000 + job % 20000})" in log, log

    stopped = re.search(r"stopping after optimizer step (\d+) \(signal SIGUSR2\); checkpoint written to (\S+)", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert step == 2                                    # the first logging step (log_every 2)
    assert f"requeueing job {job}" in log
    resumed = log.index(f"resumed from {stopped.group(2)}")          # the second run, same log file
    assert resumed > log.index(f"requeueing job {job}")
    assert f"(optimizer step {step})" in log[resumed:].splitlines()[0]

    # The two runs together trained exactly the uninterrupted run's steps, evaluated and exported.
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == epochs * STEPS_PER_EPOCH
    last = [r for r in rows if r["kind"] == "epoch"][-1]
    assert last["epoch"] == epochs - 1 and last["val/images"] == 40    # each val image once over 2 tasks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == epochs * STEPS_PER_EPOCH and (run / "model.pth").is_file()


PROBE = ("import json, os, sys; sys.path.insert(0, os.getcwd()); "
         "from fastdeit.distributed import env_from; e = env_from(os.environ); "
         "print(json.dumps(dict(node=os.environ['SLURMD_NODENAME'], rank=e.rank, world=e.world_size, "
         "local=e.local_rank, master=e.master_addr)))")


def test_multi_node_template_maps_ranks_over_two_nodes(slurm, checkout, dataset, tmp_path):  # noqa: F811
    """Two slurmd "nodes" on this host (partition `pair`), one task each, as the multi-node
    template lays out N nodes x 8 GPUs: global rank from SLURM_PROCID, local rank 0 on each
    node, the master address the first node of the allocation. The job stages the data to each
    node's own folder first (data.stage_to with $SLURMD_NODENAME, expanded per node) and trains
    from the copies."""
    two_nodes = ["--partition=pair", "--nodes=2", "--ntasks-per-node=1"]
    probe = slurm.run(["srun", *two_nodes, "--cpus-per-task=1", sys.executable, "-c", PROBE], cwd=checkout)
    layout = sorted((json.loads(line) for line in probe.stdout.splitlines()), key=lambda r: r["rank"])
    assert layout == [
        dict(node=slurm.node, rank=0, world=2, local=0, master=slurm.node),
        dict(node=slurm.second, rank=1, world=2, local=0, master=slurm.node),
    ]

    run = tmp_path / "run"
    request = [*CPU_REQUEST, *two_nodes]        # later options win: 2 nodes x 1 task
    local = tmp_path / "local"
    job = submit(slurm, checkout, "multi_node.sbatch", dataset, run, "trainer.epochs=1",
                 f"data.stage_to={local}/$SLURMD_NODENAME", request=request)
    info = slurm.wait_done(job, timeout=240)
    log = assert_completed(slurm, checkout, job, info)
    assert info["NodeList"] == f"{slurm.node},{slurm.second}" and info["NumNodes"] == "2"
    assert f"world 2 (master {slurm.node}:{20000 + job % 20000})" in log, log
    assert epochs_of(run)[-1]["step"] == STEPS_PER_EPOCH
    copies = [local / node / Path(dataset).name for node in (slurm.node, slurm.second)]
    assert all(f"data staged on {node}: {dataset} -> {c} in " in log for node, c in zip((slurm.node, slurm.second), copies))
    for copy in copies:      # each node's copy holds the tree the run was given
        assert sorted(p.relative_to(copy) for p in copy.rglob("*.jpg") if p.is_file()) == \
            sorted(p.relative_to(dataset) for p in Path(dataset).rglob("*.jpg") if p.is_file())


def test_two_nodes_stage_data_to_their_own_disk_behind_one_barrier(slurm, flat_tree, tmp_path):  # noqa: F811
    """data.stage_to on two slurmd "nodes" x two tasks (tests/stage_probe.py: a gloo group joined
    as training joins it, then fastdeit.data.stage.stage_data): each node's local rank 0 copies to
    its own folder (data.stage_to names $SLURMD_NODENAME, expanded per node), checked byte for
    byte; every rank leaves the barrier only after both copies end (each copier sleeps 2 s
    first). Again after tearing node b's copy: node a reuses everything, node b copies that file."""
    from fastdeit.data import pack as packmod
    from tests.launching import free_port
    from tests.test_data_stage import assert_same_tree

    source = tmp_path / "shared" / "inet"
    assert packmod.main([flat_tree[0], str(source), "--shard-size", "12KB", "--quiet", "--workers", "1"]) == 0
    env = dict(slurm.env, MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    cmd = ["srun", "--partition=pair", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", sys.executable,
           str(ROOT / "tests" / "stage_probe.py"), str(source), str(tmp_path / "local" / "$SLURMD_NODENAME")]

    def run(delay):
        proc = slurm.run([*cmd, str(delay)], env=env, timeout=240)
        return sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                      key=lambda r: r["rank"])

    ranks = run(2.0)
    nodes = {n: tmp_path / "local" / n / "inet" for n in (slurm.node, slurm.second)}
    assert [(r["node"], r["local"]) for r in ranks] == [(slurm.node, 0), (slurm.node, 1), (slurm.second, 0),
                                                        (slurm.second, 1)]
    copiers = [r for r in ranks if "result" in r]
    assert [r["local"] for r in copiers] == [0, 0]                       # one copier per node
    for r in ranks:
        assert r["root"] == str(nodes[r["node"]])
        assert r["left_barrier"] >= max(c["at"] for c in copiers)        # waited for both nodes' copies
    for c in copiers:
        assert c["result"]["copied"] == c["result"]["files"] > 3 and c["result"]["checksums"]
    for dest in nodes.values():
        assert_same_tree(source, dest)

    torn = sorted((nodes[slurm.second] / "train").glob("shard-*.tar"))[0]
    torn.write_bytes(torn.read_bytes()[:512])
    again = {r["node"]: r["result"] for r in run(0.0) if "result" in r}
    assert again[slurm.node]["copied"] == 0 and again[slurm.node]["kept"] == again[slurm.node]["files"]
    assert again[slurm.second]["copied"] == 1
    assert_same_tree(source, nodes[slurm.second])
