"""A real one-node SLURM cluster (munged, slurmctld, slurmd from Debian's packages) for the tests.

`slurm_cluster` (session-scoped) installs `slurm-wlm` and `munge` with apt-get when they are
missing, writes a munge key and a `slurm.conf` into a temporary directory (this host, 2 CPUs,
`proctrack/linuxproc`, `task/none`, one partition, requeue allowed, free ports, so it does not touch a
system cluster), starts the three daemons, waits for the node to be idle and stops them at the end.
On a developer machine that cannot host a cluster (no apt-get, not root) it skips; in CI (``CI`` set,
as `.ci/run` does), where these tests are the acceptance of the SLURM integration, it fails instead. A
failed install always fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _have_programs() -> bool:
    return all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in PROGRAMS)


def unavailable(reason: str) -> None:
    """This machine cannot host the test cluster: skip, except in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the SLURM tests)")
    pytest.skip(reason)


def ensure_packages() -> None:
    """apt-get install slurm-wlm munge (after an `apt-get update` if the first try fails)."""
    if _have_programs():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if shutil.which("apt-get") is None:
        unavailable("slurm-wlm and munge are not installed and there is no apt-get to install them")
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode or not _have_programs():
        pytest.fail(f"cannot install slurm-wlm and munge with apt-get: {(proc.stderr or proc.stdout)[-400:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    env: dict[str, str]  # SLURM_CONF set: pass to every client command and job

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def job_field(self, job_id: str, field: str) -> str:
        """A field of `scontrol show job` (e.g. JobState, Restarts, ExitCode)."""
        out = self.run("scontrol", "-o", "show", "job", job_id)
        for record in out.splitlines():
            for item in record.split():
                key, _, value = item.partition("=")
                if key == field:
                    return value
        raise KeyError(f"{field} not in `scontrol show job {job_id}`: {out}")

    def wait_job(self, job_id: str, timeout: float = 300) -> str:
        """Wait until the job (or every task of an array) has ended; returns the last state seen."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).split()
            if not states:
                return self.run("scontrol", "-o", "show", "job", job_id, check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still queued after {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted((self.root / "log").glob("*.log")))


def _write_config(root: Path, node: str) -> Path:
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sgtmtest",
        f"SlurmctldHost={node}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=5",  # requeued jobs wait cred_expire+1 s
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1,sched_interval=1",  # start requeued and array jobs promptly
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobRequeue=1",
        "ReturnToService=2",
        "KillWait=10",
        "MinJobAge=600",
        "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        f"NodeName={node} CPUs=2 State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


def _stop(pid_file: Path) -> None:
    if pid_file.is_file():
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def start_cluster(root: Path) -> SlurmCluster:
    node = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = _write_config(root, node)
    env = dict(os.environ, SLURM_CONF=str(conf))
    m = root / "munge"
    subprocess.run([_sbin("munged"), "--force", f"--key-file={key}", f"--socket={m / 'munge.socket'}",
                    f"--pid-file={m / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={m / 'munged.seed'}"], check=True, capture_output=True)
    subprocess.run([_sbin("slurmctld"), "-c", "-f", str(conf)], env=env, check=True, capture_output=True)
    subprocess.run([_sbin("slurmd"), "-c", "-f", str(conf)], env=env, check=True, capture_output=True)
    cluster = SlurmCluster(root=root, conf=conf, node=node, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = cluster.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    stop_cluster(cluster)
    raise RuntimeError(f"the SLURM node never became idle (state {state!r}):\n{cluster.log_tail()}")


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel what is left (a failed test may leave jobs), let their steps end, stop the daemons."""
    cluster.run("scancel", "--full", "-u", "root", check=False)
    deadline = time.time() + 30
    while cluster.run("squeue", "-h", check=False).strip() and time.time() < deadline:
        time.sleep(0.5)
    run = cluster.root / "run"
    for pid_file in (run / "slurmd.pid", run / "slurmctld.pid", cluster.root / "munge" / "munged.pid"):
        _stop(pid_file)
    time.sleep(1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    ensure_packages()
    if os.geteuid() != 0:
        unavailable("slurmd must run as root to launch job steps")
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
