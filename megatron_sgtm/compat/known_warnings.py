"""Third-party start-up chatter that says nothing about the run, filtered so a log opens with our own lines.

Each entry is one known message (matched from its start), never a whole category or package: a warning
not listed here still shows. ``megatron-sgtm --debug`` leaves everything on.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category): why each one is harmless.
KNOWN_WARNINGS: list[tuple[str, type[Warning]]] = [
    # megatron-core falls back to torch implementations when the optional fused kernels are absent (CPU, or a
    # GPU image without Apex / Transformer Engine): the fallbacks are what the tests check.
    (r"Apex is not installed", UserWarning),
    (r"Transformer Engine and Apex are not installed", UserWarning),
    # megatron-core's own default (cuda_graph_scope="full") warns about itself; CUDA graphs are not used here.
    (r"full scope is deprecated", UserWarning),
    # megatron-core calls the old torch.distributed names (reduce_scatter_tensor, all_gather_into_tensor).
    (r"`torch\.distributed\.\w+` is deprecated", FutureWarning),
    # megatron-core's optimizer zero_grad reads `.grad` of its non-leaf parameter views (None there, as it expects).
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning),
]

# DeepSpeed logs through its own "DeepSpeed" logger, not `warnings`.
KNOWN_DEEPSPEED_LOGS: tuple[str, ...] = (
    "Setting accelerator to CPU",  # the CPU runs are deliberate; on a GPU machine this line does not appear
    "**** You are using ZeRO with an untested optimizer",  # our GatedOptimizer, tested in tests/distributed
)


class _KnownDeepSpeedLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KNOWN_DEEPSPEED_LOGS)


_DEEPSPEED_FILTER = _KnownDeepSpeedLogs()


def filter_known_warnings() -> None:
    """Install the filters (idempotent); call before megatron-core or DeepSpeed is imported."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_FILTER)  # the logger DeepSpeed creates on import
