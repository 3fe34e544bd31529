"""Scaling-law sweeps: the model-size table, grid expansion, SLURM job arrays (or a local runner), collection."""
