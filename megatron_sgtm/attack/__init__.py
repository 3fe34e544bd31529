"""The fine-tuning attack on a released model (`megatron-sgtm attack finetune`) and its robustness experiment."""
