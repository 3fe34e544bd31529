"""torch LayerNorm/RMSNorm usable under sequence parallelism (megatron's torch wrapper refuses SP)."""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` per ``config.normalization``.

    Under sequence parallelism each TP rank normalises a slice of the sequence, so the norm's
    gradients are partial sums; marking the parameters ``sequence_parallel`` makes megatron's
    ``finalize_model_grads`` all-reduce them across the TP group, as it does for apex/TE norms.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: expected LayerNorm or RMSNorm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
