"""Fixtures of the distributed tests: the session's real SLURM cluster (started once, on first use)."""

from tests.support.slurm_cluster import slurm_cluster  # noqa: F401  (a session fixture, found by name)
