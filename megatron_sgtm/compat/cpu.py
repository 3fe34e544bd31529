"""Run megatron-core on CPU when CUDA is absent; a strict no-op on a GPU machine.

megatron-core assumes CUDA in a handful of places (``torch.cuda.current_device()``, literal
``device="cuda"`` factory calls, ``Tensor.cuda()``, ``torch.cuda.synchronize``, the CUDA RNG
tracker and the optimizers' ``param.type() == 'torch.cuda.FloatTensor'`` checks). On a machine
without CUDA, :func:`enable_cpu_execution` maps those to the CPU so that GPTModel with TP/PP/DP/SP,
megatron DDP, the DistributedOptimizer and the pipeline schedules run under gloo. When CUDA is
available it returns ``False`` and changes nothing.

Written for megatron-core 0.16 (it replaces private RNG helpers of ``megatron.core.tensor_parallel.random``)
and torch 2.13 (the frame depth at which a function mode sees its caller); verified on CPU with those only.
GPU machines never enable the shims, whatever their torch.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch.overrides import TorchFunctionMode

from megatron_sgtm.compat import require

_CPU = torch.device("cpu")
_MODE: TorchFunctionMode | None = None


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device
    return isinstance(device, int) and not isinstance(device, bool)


def _called_from_megatron(depth: int) -> bool:
    module = sys._getframe(depth).f_globals.get("__name__", "")
    return module.startswith("megatron.")


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers only accept 'torch.cuda.*Tensor' parameters.
            name = func(*args)
            if _called_from_megatron(2) and not name.startswith("torch.cuda."):
                name = name.replace("torch.", "torch.cuda.", 1)
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


def enable_cpu_execution() -> bool:
    """Map megatron-core's CUDA assumptions to the CPU. Returns whether the CPU shims are active. When DeepSpeed is
    imported already, its CPU shared-memory all-reduce op is not JIT-built either (`skip_cpu_shm_comm_build`):
    a DeepSpeed script imports deepspeed before calling this."""
    global _MODE
    if torch.cuda.is_available():
        return False
    if "deepspeed" in sys.modules:
        from megatron_sgtm.compat.deepspeed import skip_cpu_shm_comm_build

        skip_cpu_shm_comm_build()
    require("megatron-core", ("0.16",), "CPU execution shims")
    require("torch", ("2.13",), "CPU execution shims")
    if _MODE is not None:
        return True
    import megatron.core.tensor_parallel.random as mrandom

    # A device object (not an index) so that `device=torch.cuda.current_device()` also works in
    # backward, where the autograd engine runs without the function mode below.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *_a, **_k: None
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    # The "CUDA" tracker now forks the CPU generator, which that module warns about at every use.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    return True
