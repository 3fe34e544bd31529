"""Post-hoc unlearning baselines (RMU, CIR) that turn a trained checkpoint into a model-only one."""
