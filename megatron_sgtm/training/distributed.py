"""Process-group setup from torchrun's or SLURM's environment."""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import subprocess

import torch
import torch.distributed as dist

from megatron_sgtm.compat.cpu import enable_cpu_execution
from megatron_sgtm.errors import share_reports

REPORT_CLAIM_TIMEOUT_S = 5  # a store that does not answer: fall back to rank 0 reporting
_REPORTS_MADE = itertools.count()  # this process's user-error reports so far: the claim key of the next one


def _from_slurm() -> None:
    """srun without torchrun: derive torchrun's variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def first_slurm_host() -> str:
    """Rank 0's host: the first node of the step (srun places task 0 there); `scontrol` expands
    node lists such as ``gpu[03-04,07]``."""
    if int(os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))) <= 1:
        return "127.0.0.1"
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    """The world size torchrun or srun will give this job, known before any process group exists."""
    _from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, on_gpu). NCCL on GPUs, gloo (with the CPU shims) otherwise."""
    _from_slurm()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_execution()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` run: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=30)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))  # what env:// init does, store kept
        dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
        share_reports(lambda: _first_to_report(store))
    return dist.get_rank(), dist.get_world_size(), on_gpu


def _first_to_report(store: dist.Store) -> bool:
    """True for the first rank of this launch (and torchrun restart) to report a user error: a counter in the
    rendezvous store, which torchrun's agent (or rank 0) serves while ranks wait in collectives. A process
    reports at most once before it exits; one that runs several commands (tests) counts its own reports."""
    store.set_timeout(datetime.timedelta(seconds=REPORT_CLAIM_TIMEOUT_S))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return store.add(f"megatron_sgtm/error_reported/{restart}/{next(_REPORTS_MADE)}", 1) == 1
