"""SGTM submodules for megatron-core: masked linears, their autograd functions, attention, norms, layer specs."""
