"""Checkpoint export: Hugging Face conversion (llama-style, gpt2-style), Θ_F ablation of global states, pruning.

- `hf`: `to_hf` / `from_hf` between a global megatron state (TP=1/PP=1 names, as from
  `layout.gather_global`) and a `LlamaForCausalLM` / `GPT2LMHeadModel` state; `write_hf_dir` (atomic,
  safetensors, tokenizer) and `read_hf_dir` (safetensors only).
- `prune`: the Θ_F/Θ_R/Θ_J regions of a global state (the rules of `regions.param_regions`),
  `ablate_state`, `prune` (physically removing the forget heads and MLP units from an HF state) and
  `summarize` (counts for a release manifest).
"""
