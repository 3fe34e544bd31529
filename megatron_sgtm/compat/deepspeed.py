"""DeepSpeed 0.19 patches: no CPU shm op build, weights-only checkpoint reads, ZeRO-1/2 state re-linking."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch

from megatron_sgtm.compat import require

KNOWN = ("0.19",)


def skip_cpu_shm_comm_build() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (~2 min, needs a
    compiler) that only its inference all-reduce uses; training runs on torch.distributed (gloo) as
    it does when the op is unavailable, so skip the build."""
    require("deepspeed", KNOWN, "skip_cpu_shm_comm_build")
    # importlib, not `import deepspeed.comm.torch as m`: that can resolve to the `torch` package
    # re-exported by deepspeed.comm, and the patch would then miss DeepSpeed's module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints (found by loading them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(engine) -> Iterator[None]:
    """DeepSpeed's TorchCheckpointEngine loads with ``torch.load(weights_only=False)``; read our
    checkpoints with ``weights_only=True`` instead, allowing just DeepSpeed's own plain classes."""
    require("deepspeed", KNOWN, "weights_only_loads")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        yield  # another checkpoint engine (e.g. a configured async/remote one) keeps its own loader
        return
    allowed = _safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        del checkpoint_engine.load


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """DeepSpeed's zero_to_fp32 calls ``torch.load(weights_only=False)``; make those loads weights-only
    (as `weights_only_loads`, which must call `torch.load` as patched at load time, not wrap it here)."""
    require("deepspeed", KNOWN, "weights_only_torch_load")
    original = torch.load
    allowed = _safe_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def relink_optimizer_states(zero) -> None:
    """ZeRO-1/2 link each parameter's optimizer-state fragments once, after the first group's step, so
    state the client optimizer creates later (or eagerly, before any step) would stay unlinked and
    DeepSpeed's safe_get_full_optimizer_state would fail for it: link again now."""
    require("deepspeed", KNOWN, "relink_optimizer_states")
    if getattr(zero, "_hp_optimizer_states_linked", None) is not None:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
