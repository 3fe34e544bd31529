"""Test layout: `unit/` runs in this process; `distributed/` launches real gloo process groups
(torchrun workers in `distributed/workers/`), subprocesses of the CLI and a real SLURM cluster;
`support/` holds the shared helpers (independent reference model, cases, fixtures)."""
