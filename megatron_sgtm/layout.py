"""Between a rank's local shards and the global (TP=1, PP=1) layout of a GPTModel's tensors.

`native_shapes` lists the global names and shapes; `gather_global` reassembles any per-parameter
tensors (weights, gradients, optimizer moments) into them; `load_global` copies a global state into this rank's shards.
Global names are megatron's, with layers numbered across pipeline stages. A gated fc1 is stored
per rank as [gate_r; up_r]; globally it is [gate; up].
"""

from __future__ import annotations

import hashlib
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sgtm.model import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the global state of a GPTModel built from `cfg` (our layer spec)."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    kv = h // cfg.num_attention_heads
    norm = ("weight", "bias") if cfg.normalization == "LayerNorm" else ("weight",)
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    if cfg.position_embedding == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (cfg.seq_length, h)
    linears = {
        "self_attention.linear_qkv": ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * kv, h),
        "self_attention.linear_proj": (h, cfg.num_attention_heads * kv),
        "mlp.linear_fc1": ((2 if cfg.gated else 1) * ffn, h),
        "mlp.linear_fc2": (h, ffn),
    }
    for i in range(cfg.num_layers):
        prefix = f"decoder.layers.{i}."
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            shapes.update({f"{prefix}{name}.{s}": (h,) for s in norm})
        for name, shape in linears.items():
            shapes[f"{prefix}{name}.weight"] = shape
            if cfg.bias:
                shapes[f"{prefix}{name}.bias"] = shape[:1]
    shapes.update({f"decoder.final_layernorm.{s}": (h,) for s in norm})
    if not cfg.tie_embeddings:
        shapes["output_layer.weight"] = (cfg.vocab_size, h)
    return shapes


def global_name(model: torch.nn.Module, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{name[match.end():]}"


def _is_tied_copy(model: torch.nn.Module, name: str) -> bool:
    """The last stage's copy of tied embeddings is the first stage's word embedding."""
    return name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False)


def _tp_pieces(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The parts TP splits separately: a gated fc1's gate and up halves, else the whole tensor."""
    gated = model.config.gated_linear_unit and ".mlp.linear_fc1." in name
    return list(torch.chunk(tensor, 2, dim=0)) if gated else [tensor]


def merge_tp_shards(model: torch.nn.Module, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor of parameter `name` from its TP ranks' shards, in rank order. `model` may be
    built at any TP size: only the parameter's TP attributes are read."""
    param = dict(model.named_parameters())[name]
    if not getattr(param, "tensor_model_parallel", False) or len(shards) == 1:
        return shards[0]
    dim = param.partition_dim
    pieces = [_tp_pieces(model, name, t) for t in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim=dim) for i in range(len(pieces[0]))], dim=dim)


@torch.no_grad()
def gather_global(model: torch.nn.Module, local: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Global tensors on every rank. `local` maps parameter names to tensors shaped like them
    (default: the parameters themselves)."""
    params = dict(model.named_parameters())
    local = {n: p.detach() for n, p in params.items()} if local is None else local
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = tp_group.size()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in local.items():
        if _is_tied_copy(model, name):
            continue
        param = params[name]
        tensor = tensor.detach().float().cpu().clone()  # a copy, never a view of live buffers
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            gathered = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(gathered, tensor, group=tp_group)
            tensor = merge_tp_shards(model, name, gathered)
        out[global_name(model, name)] = tensor
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if pp_group.size() > 1:
        stages: list[dict] = [None] * pp_group.size()
        dist.all_gather_object(stages, out, group=pp_group)
        out = {k: v for stage in stages for k, v in stage.items()}
    return out


def _local_shard(model: torch.nn.Module, name: str, param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the global `tensor` of parameter `name`."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        rank = parallel_state.get_tensor_model_parallel_rank()
        dim = param.partition_dim
        pieces = _tp_pieces(model, name, tensor)
        tensor = torch.cat([torch.chunk(p, tp, dim=dim)[rank] for p in pieces], dim=dim)
    if tensor.shape != param.shape:
        raise ValueError(f"{name}: global shard shape {tuple(tensor.shape)} != parameter {tuple(param.shape)}")
    return tensor


def _global_key(model: torch.nn.Module, name: str) -> str:
    return "embedding.word_embeddings.weight" if _is_tied_copy(model, name) else global_name(model, name)


@torch.no_grad()
def load_global(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a global state (as from `gather_global`) into this rank's parameter shards."""
    for name, param in model.named_parameters():
        key = _global_key(model, name)
        if key not in state:
            raise KeyError(f"global state has no tensor {key!r} for parameter {name!r}")
        param.copy_(_local_shard(model, name, param, state[key]).to(param.dtype))


@torch.no_grad()
def init_layout_invariant(model: torch.nn.Module, seed: int, std: float, num_layers: int) -> None:
    """Initialise every parameter from its *global* name and shape, so that any TP/PP layout starts
    from the same weights (megatron's own initialisation depends on the layout). Weights ~ N(0, std)
    (output projections std / sqrt(2 * num_layers)), biases 0, norm gains 1."""
    for name, param in model.named_parameters():
        key = _global_key(model, name)
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
        if key.endswith("layernorm.weight"):
            tensor = torch.ones(shape)
        elif key.endswith("bias"):
            tensor = torch.zeros(shape)
        else:
            output = key.endswith(("linear_proj.weight", "linear_fc2.weight"))
            scale = std / (2.0 * num_layers) ** 0.5 if output else std
            digest = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")
            gen = torch.Generator().manual_seed(digest % (2**63))
            tensor = torch.randn(shape, generator=gen) * scale
        param.copy_(_local_shard(model, name, param, tensor).to(device=param.device, dtype=param.dtype))
