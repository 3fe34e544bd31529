"""Measurements on trained models: `megatron-sgtm eval`, downstream tasks, and what they report."""
