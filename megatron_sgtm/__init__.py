"""Selective Gradient Masking (SGTM) for megatron-core and DeepSpeed pretraining."""

__version__ = "0.1.0"
