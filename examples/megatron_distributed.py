"""SGTM in your own megatron-core training script, TP=2 x DP=2, on a labelled Megatron indexed dataset.

Only public `megatron_sgtm` names beside megatron-core's own (the SGTM library from `megatron_sgtm`, the labelled
dataset from `megatron_sgtm.data.indexed`): a GPTModel with the SGTM layer spec (`attach_sgtm`
completes it), megatron's DistributedDataParallel and DistributedOptimizer (`get_megatron_optimizer`), gated by
`install_step_gating`; the batches come from `LabelledGPTDataset` (megatron's GPTDataset built by
`BlendedMegatronDatasetBuilder`, plus each token's SGTM label from the sidecar `megatron-sgtm data tag-indexed`
wrote beside the index); each step's gate is `step_gate` over the step's micro-batches, all-reduced over the
data-parallel group, and every forward runs in megatron's `get_forward_backward_func` schedule inside
`with token_labels(...)`.

    megatron-sgtm data tag-indexed --prefix DATA/corpus --classifier ... [--categories DATA/categories.txt]
    torchrun --nproc-per-node=4 examples/megatron_distributed.py --prefix DATA/corpus --eod-id 1 \\
        [--init model.safetensors] [--steps 20]

`--init` loads initial weights by parameter name (megatron's TP=1 layout; each TP rank takes its slice along the
parameter's partition_dim). The hyperparameters below are those of
tests/distributed/test_megatron_distributed_example.py, which runs this script and `megatron-sgtm train` on the
same index, weights, seed and layout and compares their per-step losses. Runs on CPU (gloo, via
`enable_cpu_execution`) or on GPUs (NCCL). The last line printed (rank 0) is a JSON summary.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sgtm import (
    ModelDims,
    SGTMConfig,
    attach_sgtm,
    enable_cpu_execution,
    get_sgtm_layer_spec,
    install_step_gating,
    set_step_gate,
    step_gate,
    token_labels,
)
from megatron_sgtm.data.indexed import LabelledGPTDataset, LabelledGPTDatasetConfig, micro_batch_indices
from megatron_sgtm.data.labeling import LabelingConfig

ON_GPU = not enable_cpu_execution()  # on a machine without CUDA: megatron-core on the CPU (shims), before it runs

from megatron.core import parallel_state  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

TP = 2
VOCAB, SEQ, LAYERS, HIDDEN, HEADS, FFN = 320, 32, 2, 32, 4, 64
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, CLIP = 3e-3, 1e-4, 2, 0.1, (0.9, 0.95), 1e-8, 1.0
GLOBAL_BATCH, MICRO_BATCH, SEED = 8, 2, 1234
# how documents get their labels: the sidecar's scores, every document below tau_retain labelled R (no U: steps gate)
LABELING = LabelingConfig(retain_rate=1.0, forget_categories=("spanish",), seed=SEED)


def build_model(device: torch.device) -> GPTModel:
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        normalization="LayerNorm", activation_func=F.gelu, add_bias_linear=True, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.02, use_cpu_initialization=not ON_GPU,
        tensor_model_parallel_size=TP, calculate_per_token_loss=True,  # losses over the global batch's tokens
        # the fused kernels are GPU-only
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    # 2 of the 4 heads (one per TP rank) and 8 of the 64 MLP units per layer are Θ_F; the embeddings are Θ_R.
    partition = SGTMConfig(forget_heads=2, forget_mlp_units=8, mask_embeddings=True).resolve(
        ModelDims.from_transformer_config(config))
    model = GPTModel(config=config, transformer_layer_spec=get_sgtm_layer_spec(partition), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=False)
    return attach_sgtm(model, partition).to(device)


@torch.no_grad()
def load_weights(model: GPTModel, path: str) -> None:
    """Global (TP=1) weights by name; a tensor-parallel parameter takes this TP rank's slice."""
    from safetensors.torch import load_file

    weights, rank = load_file(path), parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        value = weights[name]
        if getattr(param, "tensor_model_parallel", False):
            value = torch.chunk(value, TP, dim=param.partition_dim)[rank]
        param.copy_(value)


def build_dataset(prefix: str, eod_id: int, steps: int) -> LabelledGPTDataset:
    """megatron's train split (all of the index here) as a LabelledGPTDataset of `steps` global batches; resets
    positions and attention at every end-of-document token and masks its loss."""
    config = LabelledGPTDatasetConfig(
        random_seed=SEED, sequence_length=SEQ, blend=([prefix], None), split="100,0,0",
        path_to_cache=f"{prefix}.example_cache", tokenizer=NullTokenizer(eod_id), reset_position_ids=True,
        reset_attention_mask=True, eod_mask_loss=True, create_attention_mask=True, labeling=LABELING)
    train, _, _ = BlendedMegatronDatasetBuilder(LabelledGPTDataset, [steps * GLOBAL_BATCH, 0, 0],
                                                lambda: True, config).build()
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True, help="the indexed dataset (PREFIX.bin/.idx + its sidecar)")
    parser.add_argument("--eod-id", type=int, required=True, help="the index's end-of-document token id")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--init", help="initial weights (safetensors, by parameter name, TP=1 layout)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if ON_GPU else "gloo")
    if ON_GPU:
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    device = torch.device("cuda" if ON_GPU else "cpu")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    model_parallel_cuda_manual_seed(SEED)
    torch.manual_seed(SEED)
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    model = build_model(device)
    if args.init:
        load_weights(model, args.init)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=MIN_LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_eps=EPS, clip_grad=CLIP, use_distributed_optimizer=True, params_dtype=torch.float32), [ddp])
    gated = install_step_gating(optimizer, model)  # the inner optimizers, with the region code of every element
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP,
        lr_decay_steps=max(args.steps, WARMUP + 1), lr_decay_style="cosine", start_wd=WEIGHT_DECAY,
        end_wd=WEIGHT_DECAY, wd_incr_steps=args.steps, wd_incr_style="constant")
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads  # all-reduces and ÷ the global token count

    dataset = build_dataset(args.prefix, args.eod_id, args.steps)  # rank 0 builds megatron's indices first
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * dp_size)

    losses, gates = [], []
    for step in range(args.steps):
        batches = []
        for micro in range(num_micro):
            samples = [dataset[int(i)] for i in micro_batch_indices(
                step, micro, micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH, dp_rank=dp_rank,
                dp_size=dp_size)]
            batches.append({k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]})
        gate = step_gate(batches, group=dp_group)  # from every DP rank's loss-bearing token labels
        set_step_gate(gated, gate)

        def forward_step(data_iterator, module):
            mb = next(data_iterator)
            with token_labels(mb["token_labels"]):  # the SGTM layers route this micro-batch's gradients
                per_token = module(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])

            def loss_func(output: torch.Tensor):
                loss = (output.float() * mb["loss_mask"]).sum()
                tokens = mb["loss_mask"].sum().to(torch.int)
                return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}

            return per_token, loss_func

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
                                          num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                                          forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        total = torch.stack([item["lm loss"].double().cpu() for item in out]).sum(0)
        dist.all_reduce(total, group=dp_group)  # (loss sum, tokens) over the global batch
        losses.append(float(total[0] / total[1]))
        gates.append([gate.retain, gate.forget])
        if dist.get_rank() == 0:
            print(f"step {step + 1:3d}  loss {losses[-1]:.5f}  gate {gate}", flush=True)
    if dist.get_rank() == 0:
        print(json.dumps({"losses": losses, "gates": gates}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
