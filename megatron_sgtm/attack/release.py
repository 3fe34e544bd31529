"""The model a developer would release, as a model-only checkpoint the trainer can start from.

SGTM's release is the ablated model (Θ_F zeroed); a baseline's (no partition, or one already ablated or
unlearned) is its weights as they are. Reading a training checkpoint needs a world of one, so under torchrun
rank 0 writes the release in a child process (``python -m megatron_sgtm.attack.release IN OUT``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_sgtm.errors import UserError

# torchrun's and srun's variables: without them the child process is a world of one (with
# TORCHELASTIC_USE_AGENT_STORE it would wait for a rendezvous store that never comes).
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")
_DISTRIBUTED_PREFIXES = ("TORCHELASTIC_",)


class ReleaseError(UserError, RuntimeError):
    """The released model could not be written."""


def is_released(meta: dict, partition) -> bool:
    """A model-only checkpoint with nothing left to ablate: the trainer starts from it as it is."""
    return meta["engine"] == "model-only" and (partition is None or not partition.active or meta.get("ablated", False))


def write_release(checkpoint: Path, out: Path) -> bool:
    """`checkpoint` (any engine and layout) as a model-only checkpoint at `out`, ablated when it carries an
    active partition; True when ablated. Runs in this process, which must be a world of one."""
    from megatron_sgtm.export.native import load_native
    from megatron_sgtm.export.writers import write_model_only_copy

    ckpt = load_native(checkpoint)
    ablate = not is_released({**ckpt.meta, "engine": "model-only"}, ckpt.partition)
    zeroed = write_model_only_copy(ckpt, out, ablate=ablate)
    print(f"released model: {out} ({f'{zeroed:,} forget parameters zeroed' if ablate else 'weights as trained'})",
          file=sys.stderr)
    return ablate


def write_release_in_child(checkpoint: Path, out: Path) -> None:
    """`write_release` in a fresh single-process world (for a rank of a torchrun job)."""
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV and not k.startswith(_DISTRIBUTED_PREFIXES)}
    proc = subprocess.run([sys.executable, "-m", "megatron_sgtm.attack.release", str(checkpoint), str(out)],
                          env=env, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise ReleaseError(f"{checkpoint}: writing the released model failed: {lines[-1]}")


if __name__ == "__main__":
    from megatron_sgtm.compat.known_warnings import filter_known_warnings

    filter_known_warnings()
    write_release(Path(sys.argv[1]), Path(sys.argv[2]))
