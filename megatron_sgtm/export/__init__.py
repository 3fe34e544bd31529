"""Checkpoint export: native checkpoints read offline (`native`), Hugging Face conversion and model
directories (`hf`), Θ_F ablation of global states, physical pruning and release summaries (`prune`)."""
