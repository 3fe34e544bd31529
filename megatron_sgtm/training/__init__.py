"""`megatron-sgtm train`: config, engines, step gating, checkpoints, evaluation, logging, loop."""
