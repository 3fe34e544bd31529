"""Native checkpoints offline: any engine and TP/PP/DP layout read into the global (TP=1, PP=1) weights.

A training checkpoint is a megatron distributed or DeepSpeed ZeRO checkpoint plus ``meta.json`` (config,
SGTM partition, step). Reading one builds the model once in this process, in a world of one, and lets
megatron reshard its checkpoint into it (or merges DeepSpeed's ZeRO partitions per TP rank, then the TP
shards). *Model-only* checkpoints (``ablate``, ``import-hf``) hold ``model.safetensors`` beside ``meta.json``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sgtm.compat.deepspeed import weights_only_torch_load
from megatron_sgtm.core.partition import Partition, PartitionError
from megatron_sgtm.export.hf import check_state
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.model import ModelConfig
from megatron_sgtm.training.checkpoint import META, CheckpointError, load_model_only, read_meta
from megatron_sgtm.training.config import recorded_config, recorded_sgtm

ENGINES = ("megatron", "deepspeed", "model-only")


@dataclass
class NativeCheckpoint:
    """A checkpoint read into `module`; `state` holds the module's own weight tensors under their global
    names (ablating the module changes them)."""

    path: Path
    meta: dict
    model: ModelConfig
    partition: Partition | None
    module: torch.nn.Module
    state: dict[str, torch.Tensor]


def read_model_meta(path: Path) -> tuple[dict, ModelConfig, Partition | None]:
    """meta.json of a complete checkpoint, its model config and partition, checked against each other."""
    meta_file = path / META
    meta = read_meta(path)
    engine = meta.get("engine")
    if engine not in ENGINES:
        raise CheckpointError(f"{meta_file}: engine={engine!r}: unknown layout (expected one of {ENGINES})")
    try:
        model = ModelConfig(**meta["config"]["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{meta_file}: config.model is missing or invalid ({err})") from err
    partition = None
    if meta.get("partition") is not None:
        try:
            partition = Partition.from_dict(meta["partition"])
            sgtm = recorded_sgtm(recorded_config(meta))
            expected = sgtm.resolve(model.dims()) if sgtm is not None else None
        except (KeyError, TypeError, ValueError, PartitionError) as err:
            raise CheckpointError(f"{meta_file}: partition is invalid ({err})") from err
        if expected is not None and expected.to_dict() != partition.to_dict():
            raise CheckpointError(
                f"{meta_file}: partition {partition.to_dict()} does not match the one config.sgtm gives for "
                f"config.model ({expected.to_dict()})"
            )
        if partition.dims != model.dims():
            raise CheckpointError(f"{meta_file}: partition was resolved for {partition.dims}, but config.model "
                                  f"has {model.dims()}")
    return meta, model, partition


def load_native(path: Path | str) -> NativeCheckpoint:
    """The global fp32 weights of a training or model-only checkpoint (any engine, any layout)."""
    path = Path(path)
    meta, model, partition = read_model_meta(path)
    engine = meta["engine"]
    module = reference_model(model, partition)
    if engine == "megatron":
        _load_megatron(path, module)
    else:
        state = load_model_only(path)[1] if engine == "model-only" else _deepspeed_state(path, meta, module)
        check_state(f"{path}: the stored state", state, native_shapes(model), CheckpointError)
        _adopt(module, state)
    state = {n: p.detach() for n, p in module.named_parameters() if not _tied_output(module, n)}
    return NativeCheckpoint(path, meta, model, partition, module, state)


def reference_model(model: ModelConfig, partition: Partition | None) -> torch.nn.Module:
    """The model at TP=1, PP=1 on CPU in a world of one (this process), to read checkpoints into."""
    from megatron.core import parallel_state as ps

    from megatron_sgtm.model import build_gpt_model
    from megatron_sgtm.training.distributed import init_distributed

    _rank, world, on_gpu = init_distributed()
    if world != 1:
        raise CheckpointError("megatron-sgtm checkpoint tools run as a single process (not under torchrun/srun)")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    # No random initialisation: every weight comes from the checkpoint, and untouched memory costs nothing.
    config = model.transformer_config(on_gpu=False, perform_initialization=False)
    module = build_gpt_model(model, config, partition, backend="local")
    _set_tp_attributes(module)
    return module


def _set_tp_attributes(module: torch.nn.Module) -> None:
    """megatron marks weights tensor-parallel (partition dim) only while initialising them; the TP merge
    of DeepSpeed shards reads those marks."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    dims = ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1))
    for layer in module.modules():
        dim = next((d for cls, d in dims if isinstance(layer, cls)), None)
        if dim is not None and getattr(layer, "weight", None) is not None:
            set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)


def _adopt(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make the loaded tensors the module's weights (TP=1, PP=1 names), without copying them."""
    for name, param in module.named_parameters():
        key = "embedding.word_embeddings.weight" if _tied_output(module, name) else name
        if key not in state:  # loaded in place through views (built factories)
            continue
        tensor = state[key]
        if tensor.data_ptr() != param.data_ptr():
            if tensor.shape != param.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            param.data = tensor.to(param.dtype)


def _tied_output(reference: torch.nn.Module, name: str) -> bool:
    return name == "output_layer.weight" and reference.share_embeddings_and_output_weights


def _load_megatron(path: Path, module: torch.nn.Module) -> None:
    """megatron reshards its distributed checkpoint (any TP/PP) into the TP=1, PP=1 module."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: name it

    # Factories (SwiGLU's gate/up halves) built up front load straight into views of the weights;
    # megatron's own merge would concatenate a second copy of them.
    sharded = module.sharded_state_dict()
    apply_factories(sharded)
    try:
        state = dist_checkpointing.load({"model": sharded}, str(path))
    except (CheckpointingException, CheckpointException, FileNotFoundError, RuntimeError, ValueError,
            KeyError) as err:
        raise CheckpointError(f"{path}: unreadable megatron distributed checkpoint (missing or partial "
                              f"shard files?): {err}") from err
    _adopt(module, {k: v for k, v in state["model"].items() if torch.is_tensor(v)})


def _deepspeed_state(path: Path, meta: dict, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ZeRO partitions merged per TP rank (DeepSpeed's own zero_to_fp32), then the TP shards merged."""
    from deepspeed.utils import zero_to_fp32

    from megatron_sgtm.layout import merge_tp_shards
    from megatron_sgtm.training.engine_deepspeed import CHECKPOINT_TAG

    tp = int(meta["config"]["parallel"]["tensor_model_parallel_size"])
    tag_dir = path / CHECKPOINT_TAG
    shards: list[dict[str, torch.Tensor]] = []
    for rank in range(tp):
        files = sorted(tag_dir.glob(f"*mp_rank_{rank:02d}_*.pt"))
        if not any(f.name.endswith("_optim_states.pt") for f in files):
            raise CheckpointError(f"{tag_dir}: no ZeRO optimizer-state files for TP rank {rank} (partial checkpoint?)")
        with tempfile.TemporaryDirectory() as tmp:
            for file in files:  # zero_to_fp32 reads one model-parallel rank, named mp_rank_00
                os.symlink(file, Path(tmp) / file.name.replace(f"mp_rank_{rank:02d}", "mp_rank_00"))
            try:
                with weights_only_torch_load():
                    lazy = zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(tmp, False)
                    state = zero_to_fp32.to_torch_tensor(lazy)  # ZeRO-3 gives lazily merged tensors
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"{tag_dir}: a file of TP rank {rank} is refused by weights_only "
                                      f"loading: {err}") from err
            except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"{tag_dir}: unreadable ZeRO files of TP rank {rank}: {err}") from err
        shards.append(state)
    names = [n for n, _ in reference.named_parameters()]
    for rank, shard in enumerate(shards):
        missing = sorted(set(names) - set(shard))
        if missing:
            raise CheckpointError(f"{tag_dir}: TP rank {rank} lacks {missing[:5]}")
    return {n: merge_tp_shards(reference, n, [s[n].float() for s in shards]) for n in names
            if not _tied_output(reference, n)}
