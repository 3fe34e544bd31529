"""All-reduce of a host (CPU) tensor under any backend.

NCCL reduces CUDA tensors only ("No backend type associated with device type cpu"), gloo reduces CPU
tensors: the counts, flags and byte totals the trainer agrees on across ranks live on the host, so under
NCCL they make a round trip through the current CUDA device and under gloo they are reduced in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_host(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The CPU `tensor` all-reduced over `group` (None: the default group); returns the reduced CPU tensor."""
    if dist.get_backend(group) == "nccl":
        on_device = tensor.cuda()
        dist.all_reduce(on_device, op=op, group=group)
        return on_device.cpu()
    dist.all_reduce(tensor, op=op, group=group)
    return tensor
