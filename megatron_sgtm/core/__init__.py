"""The SGTM library a user's own megatron-core or DeepSpeed training imports.

Labels, the strategy table, the partition, region maps and ablation, the SGTM layers and layer spec, and
optimizer step gating. Nothing here imports the application (training, data, export, evaluation, attack,
unlearning), so it can be vendored into a Megatron-LM fork on its own.
"""
