"""A real SLURM on this one host for the tests: munge, slurmctld and slurmd started from a
generated config in a temporary folder, stopped (with every job they ran) at the end of the
session.

The default partition `test` is this host's node, named as `slurmd -C` names it. A second
slurmd on the same host (`<host>-b`, its own port and spool) joins it in the partition `pair`,
so a job can span two "nodes" and srun hands out a real multi-node layout (SLURM_NODEID,
per-node SLURM_LOCALID, a two-host SLURM_JOB_NODELIST). Only the first name resolves, which is
all a job needs: the templates take the master address from the first host of the allocation.

Where slurm-wlm is missing and the tests run as root with apt-get, it is installed from the
distribution's packages (Debian: slurm-wlm and munge; 17 s on this project's machine);
otherwise the tests skip and say why. FASTDEIT_REQUIRE_SLURM=1 (CI) turns that skip into a
failure, so a machine that should run them never passes by skipping.

Nothing here touches the host's own SLURM or munge: our daemons use their own key, socket,
ports, spool and state folders, and clients find them through SLURM_CONF in `cluster.env`.
The daemons run as root (SlurmUser=root) with the plugins that need no cgroup setup
(proctrack/linuxproc, task/none); both nodes are this host as `slurmd -C` describes it. A
requeued job would wait about two minutes before starting again; `release` starts it now.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest

from fastdeit.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")
APT_PACKAGES = ("slurm-wlm", "munge")


def _missing() -> list:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_installed() -> Optional[str]:
    """None when SLURM can run here (installing it if we may), else the reason it can't."""
    if os.geteuid() != 0:
        return "the SLURM daemons must run as root (slurmd starts jobs); run the tests as root"
    if not _missing():
        return None
    if shutil.which("apt-get") is None:
        return f"slurm-wlm is not installed ({', '.join(_missing())} missing) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-600:]}"
    return None if not _missing() else f"after installing {APT_PACKAGES}: {_missing()} still missing"




def _node_line() -> str:
    """`slurmd -C`'s NodeName line for this host (CPUs, sockets, cores, threads), without
    RealMemory: memory is not scheduled here, and a node reporting a few MB less than
    configured would be drained. At least 2 CPUs, the tests' two tasks of one core (the
    config's SlurmdParameters=config_overrides lets a 1-core host declare them)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    line = re.sub(r"\s*RealMemory=\d+", "", line)
    if int(re.search(r"CPUs=(\d+)", line).group(1)) < 2:
        line = line.split()[0] + " CPUs=2"
    return line


class SlurmCluster:
    """One controller and two node daemons on this host. `env` is what clients (sbatch, srun,
    ...) need: the config path, and no SLURM_* variables of any job the tests run inside."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: Dict[str, subprocess.Popen] = {}
        spec = _node_line().split()
        self.node = spec[0].split("=", 1)[1]          # this host's name, as slurmd -C gives it
        self.second = f"{self.node}-b"
        self.spec = " ".join(spec[1:])
        for sub in ("state", "munge", "log", f"spool/{self.node}", f"spool/{self.second}"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub).chmod(0o700)
        self.munge_socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "SlurmCluster":
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in (self.node, self.second):
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait_idle(timeout=60)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged refuses a socket folder under world-writable /tmp otherwise.
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged to create its socket")

    def _write_conf(self) -> None:
        log = self.root / "log"
        # A random first job id: the templates derive MASTER_PORT from the job id, and another
        # test session's cluster on this host starts its ids elsewhere.
        first_job = random.randint(1000, 900000)
        lines = [
            "ClusterName=fastdeit-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd'}.%n.pid",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdLogFile={log / 'slurmd'}.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2",
            "SlurmdParameters=config_overrides", "KillWait=5", "InactiveLimit=0",
            f"FirstJobId={first_job}",
            # Two node daemons on one host: the same address, their own ports.
            f"NodeName={self.node} NodeAddr=127.0.0.1 Port={free_port()} {self.spec} State=UNKNOWN",
            f"NodeName={self.second} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={free_port()} "
            f"{self.spec} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=pair Nodes={self.node},{self.second} MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd) -> None:
        with open(self.root / "log" / f"{name}.stdout", "w") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                cwd=self.root)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: waiting for {what} failed "
                                   f"(exited: {dead or 'none'})\n{self.logs()}")
            time.sleep(0.3)

    def _wait_idle(self, timeout: float) -> None:
        def idle():
            proc = self.run(["sinfo", "-h", "-N", "-p", "pair", "-o", "%N %T"], check=False)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            return proc.returncode == 0 and states == {self.node: "idle", self.second: "idle"}
        self._wait(idle, timeout, f"nodes {self.node} and {self.second} to register idle")

    def stop(self) -> None:
        """Cancel every job, stop the daemons we started, then end any job process or
        slurmstepd of this cluster that outlived them (found by our SLURM_CONF in their
        environment: slurmstepd inherits slurmd's, job tasks the submitter's)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None and self.conf.is_file():
            self.run(["scancel", "--full", "--quiet", "--user=root"], check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and \
                    self.run(["squeue", "-h"], check=False, timeout=30).stdout.strip():
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self._leftovers():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def _leftovers(self) -> list:
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients

    def run(self, cmd, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: Iterable[str], cwd: Path, env: Optional[dict] = None) -> int:
        proc = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or self.env)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StartTime, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        # Only scontrol's own CamelCase fields: Command= also holds the job's key=value arguments.
        return dict(re.findall(r"(?:^|\s)([A-Z]\w*)=(\S*)", out))

    def wait_for(self, job_id: int, predicate, timeout: float, what: str) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if predicate(info):
                return info
            if time.monotonic() > deadline:
                out = Path(info.get("StdOut", ""))
                tail = out.read_text(errors="replace")[-3000:] if out.is_file() else "(no job output)"
                raise AssertionError(f"job {job_id}: timed out waiting for {what}; last state {info}\n"
                                     f"--- job output\n{tail}")
            time.sleep(1)

    def wait_done(self, job_id: int, timeout: float = 300) -> Dict[str, str]:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")
        return self.wait_for(job_id, lambda j: j["JobState"] in done, timeout, "the job to end")

    def release(self, job_id: int) -> None:
        """Start a requeued job now: SLURM holds it back for about two minutes otherwise
        (its begin time is set past the step credentials' lifetime, AuthInfo cred_expire).

        Not at once: slurmd revokes the job's credential when the previous run's batch step ends
        and refuses any credential created in the same second or before (whole seconds), which
        fails the job ("Killing non-startable batch job: Job credential revoked"). So: wait until
        no node is still completing a job, then for the second to turn."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "COMPLETING" in self.run(["scontrol", "show", "node", "-o"]).stdout:
            time.sleep(0.2)
        time.sleep(1.5)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        if os.environ.get("FASTDEIT_REQUIRE_SLURM") == "1":
            pytest.fail(f"FASTDEIT_REQUIRE_SLURM=1 but SLURM can't run here: {reason}")
        pytest.skip(f"no SLURM: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        socket.gethostbyname(cluster.node)
    except OSError as e:
        pytest.fail(f"this host's name {cluster.node!r} does not resolve ({e}): SLURM jobs take the "
                    "master address from their first node's name, so training could not start")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
