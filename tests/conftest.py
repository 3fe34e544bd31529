"""Test layout: `unit/` runs in this process; `distributed/` launches real gloo process groups
(torchrun workers in `distributed/workers/`), subprocesses of the CLI and a real SLURM cluster;
`support/` holds the shared helpers (independent reference model, cases, fixtures)."""

import os

import pytest

# No network in tests: `datasets.load_dataset` uses its local builders only (read when datasets is imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# What `init_distributed` sets in this process when a unit test runs a command in-process (eval, attack): the
# store it opens stays listening, so a later test's child process must not inherit that rendezvous port.
_RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous_env():
    before = {key: os.environ.get(key) for key in _RENDEZVOUS_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
