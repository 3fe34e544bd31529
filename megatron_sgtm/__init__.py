"""Selective Gradient Masking (SGTM) for megatron-core and DeepSpeed pretraining.

The names below, all from `megatron_sgtm.core` (plus `enable_cpu_execution`), are what a user's own
megatron-core or DeepSpeed training script needs (see docs/guide/own_training.md and the examples).
They load on first use, so `megatron-sgtm --help` and the data commands do not import torch or megatron-core.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "SGTMConfig": "megatron_sgtm.core.partition",  # which heads / MLP units are Θ_F, and the strategy
    "ModelDims": "megatron_sgtm.core.partition",  # the model shape an SGTMConfig resolves against
    "get_sgtm_layer_spec": "megatron_sgtm.core.layers.spec",  # GPTModel's transformer_layer_spec
    "TokenLabel": "megatron_sgtm.core.labels",
    "token_labels": "megatron_sgtm.core.labels",  # `with token_labels(labels):` around each forward
    "Region": "megatron_sgtm.core.strategy",
    "param_regions": "megatron_sgtm.core.regions",  # Θ_F / Θ_R / Θ_J of every parameter
    "ablate": "megatron_sgtm.core.regions",  # Θ_F := 0, in place
    "ablated": "megatron_sgtm.core.regions",  # the same, undone on exit
    "attach_sgtm": "megatron_sgtm.core.model_hooks",  # completes a GPTModel built with the SGTM spec (embeddings)
    "SGTMAdamW": "megatron_sgtm.core.gating",  # AdamW with step gating
    "ZeroSGTMAdamW": "megatron_sgtm.core.gating",  # the same as DeepSpeed ZeRO's client optimizer
    "Gate": "megatron_sgtm.core.gating",
    "StepCounts": "megatron_sgtm.core.gating",
    "step_counts": "megatron_sgtm.core.gating",  # a step's label counts and loss-mask sum, all-reduced over DP
    "step_gate": "megatron_sgtm.core.gating",  # the step's Gate from its micro-batches, all-reduced over DP
    "region_codes": "megatron_sgtm.core.gating",  # a parameter's per-element Region codes for SGTMAdamW
    "install_step_gating": "megatron_sgtm.core.optimizer_hooks",  # DistributedOptimizer, ZeRO engine or SGTMAdamW
    "set_step_gate": "megatron_sgtm.core.optimizer_hooks",  # the Gate of the next step, on the gated optimizers
    "enable_cpu_execution": "megatron_sgtm.compat.cpu",  # megatron-core on CPU (gloo); a no-op with CUDA
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
