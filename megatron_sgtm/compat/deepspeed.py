"""DeepSpeed 0.19 patches: no CPU shm op build, weights-only checkpoint reads, universal-checkpoint conversion and
loading, ZeRO-1/2 state re-linking, and the layout of ZeRO's flat fp32 partitions (where step gating finds each
parameter's elements).

ZeRO-1/2 (`stage_1_and_2.py`): per param group, the parameters in `round_robin_bit16_groups[i]` order at
`round_robin_bit16_offsets[i]` in a flat buffer of `bit16_groups_flat[i].numel()` elements (alignment padding at
the end and between parameters); rank r owns the r-th of `dp` equal slices (`get_data_parallel_partitions`),
which is `single_partition_of_fp32_groups[i]`.
ZeRO-3 (`stage3.py`): per sub-group `fp16_groups[j]`, the concatenation of each parameter's `ds_tensor`
partition: elements [r*ps, (r+1)*ps) of the flattened parameter padded to a multiple of `dp`;
`fp32_partitioned_groups_flat[j]` holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.compat import require
from megatron_sgtm.errors import StepGatingError

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


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's own `ds_to_universal` conversion of the ZeRO-1/2 checkpoint `checkpoint` (a tag directory) into
    `out`, in this process (one worker: no process pool next to a live process group), its loads weights-only.
    Checkpoints saved without universal-checkpoint info get DeepSpeed's default one (`--inject_missing_state`),
    which is complete for TP=1. The converter writes every module-state entry without a ZeRO fragment as a
    parameter and fails on megatron-core's ``_extra_state`` entries (None): it reads model states without them
    (the optimizer files linked), and `out` gets the original model states, which the engine loads."""
    require("deepspeed", KNOWN, "to_universal")
    from deepspeed.checkpoint.ds_to_universal import main as convert

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".universal_input_") as tmp, weights_only_torch_load():
        source = Path(tmp)
        for file in checkpoint.iterdir():
            if file.name.endswith("model_states.pt"):
                state = torch.load(file, map_location="cpu")
                state["module"] = {k: v for k, v in state["module"].items() if v is not None}
                torch.save(state, source / file.name)
            else:
                (source / file.name).symlink_to(file.resolve())
        args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            convert(args)
    for file in checkpoint.glob("*model_states.pt"):
        shutil.copy2(file, out / file.name)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # written next to `out`; we load by tag


@contextlib.contextmanager
def universal_loads(ds_engine) -> Iterator[None]:
    """`load_checkpoint` reads a universal checkpoint, as with ``"checkpoint": {"load_universal": true}`` in
    the config, for this load only (the engine was configured before it knew what it resumes from)."""
    require("deepspeed", KNOWN, "universal_loads")
    config = ds_engine._config
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with weights_only_torch_load():
            yield
    finally:
        config.load_universal_checkpoint = saved


def relink_optimizer_states(zero) -> None:
    """ZeRO-1/2 link each parameter's optimizer-state fragments once, after the first group's step, so
    state the client optimizer creates later (or eagerly, before any step) would stay unlinked and
    DeepSpeed's safe_get_full_optimizer_state would fail for it: link again now."""
    require("deepspeed", KNOWN, "relink_optimizer_states")
    if getattr(zero, "_hp_optimizer_states_linked", None) is not None:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def is_deepspeed_engine(obj) -> bool:
    """Whether `obj` is a DeepSpeed engine (`deepspeed.initialize`'s first result), without importing DeepSpeed."""
    return any(c.__module__.startswith("deepspeed.") and c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__)


def zero_optimizer(ds_engine) -> tuple[object, int]:
    """(DeepSpeed's ZeRO optimizer wrapping the client optimizer, ZeRO stage); refuses wrappers with another
    flat layout (e.g. DeepSpeed's BF16_Optimizer, or no ZeRO at all)."""
    require("deepspeed", KNOWN, "zero_optimizer")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage = int(ds_engine.zero_optimization_stage())
    zero = ds_engine.optimizer
    expected = DeepSpeedZeroOptimizer_Stage3 if stage == 3 else DeepSpeedZeroOptimizer
    if stage not in (1, 2, 3) or not isinstance(zero, expected):
        raise StepGatingError(f"DeepSpeed wrapped the optimizer in {type(zero).__name__} (ZeRO stage {stage}); step "
                           "gating maps the flat partitions of DeepSpeedZeroOptimizer (stage 1/2) and "
                           "DeepSpeedZeroOptimizer_Stage3 only")
    return zero, stage


def layout_partitions(ds_engine, values: Callable[[torch.nn.Parameter, int], torch.Tensor], dtype: torch.dtype,
                      fill=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Lay per-parameter flat tensors out as this rank's flat fp32 partitions (see the module docstring).

    `values(param, numel)` gives the flattened (model-space, full local shape) tensor of a model parameter;
    returns (fp32 partition the client optimizer steps, the laid-out tensor) per partition, with `fill` at
    DeepSpeed's padding."""
    zero, stage = zero_optimizer(ds_engine)
    out = []
    if stage in (1, 2):
        for i, flat in enumerate(zero.bit16_groups_flat):
            full = torch.full((flat.numel(),), fill, dtype=dtype)
            for param, meta, offset in zip(zero.round_robin_bit16_groups[i], zero.round_robin_bit16_meta[i],
                                           zero.round_robin_bit16_offsets[i]):
                full[offset:offset + meta.numel()] = values(param, meta.numel()).reshape(-1).to(dtype)
            group = zero.real_dp_process_group[i]
            world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
            sizes = [flat.numel() // world + (1 if r < flat.numel() % world else 0) for r in range(world)]
            start = sum(sizes[:rank])
            out.append((zero.single_partition_of_fp32_groups[i], full[start:start + sizes[rank]].clone()))
    else:
        for j, sub_group in enumerate(zero.fp16_groups):
            pieces = []
            for param in sub_group:
                part = param.partition_numel()
                rank = dist.get_rank(group=param.ds_process_group)
                padded = torch.full((param.ds_numel_aligned,), fill, dtype=dtype)
                padded[:param.ds_numel] = values(param, param.ds_numel).reshape(-1).to(dtype)
                pieces.append(padded[rank * part:(rank + 1) * part])
            out.append((zero.fp32_partitioned_groups_flat[j], torch.cat(pieces)))
    for fp32, laid in out:
        if laid.numel() != fp32.numel():
            raise RuntimeError(f"laid out {laid.numel()} elements for an fp32 partition of {fp32.numel()}")
    return out


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's local (TP-shard) shape, also under ZeRO-3, which empties `.shape`."""
    return getattr(param, "ds_shape", param.shape)
