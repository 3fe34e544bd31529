"""SGTM in your own DeepSpeed ZeRO training script: only the `megatron_sgtm` public names.

A megatron-core GPTModel with the SGTM layer spec (`attach_sgtm` completes it: its embeddings are Θ_R here)
trains under DeepSpeed ZeRO-1/2/3 with data parallelism. The client optimizer is `ZeroSGTMAdamW`;
`install_step_gating` gives it the region codes of the flat fp32 partitions ZeRO lays out, and before each
optimizer step `set_step_gate` sets the gate that `step_counts` derives from the step's token labels, all-reduced
over the data-parallel ranks. Each forward runs inside `with token_labels(...)`.

    torchrun --nproc-per-node=2 examples/deepspeed_zero.py --zero-stage 3 [--steps 20]
    torchrun --nproc-per-node=2 examples/deepspeed_zero.py --zero-stage 2 --batches b.pt --init model.safetensors

Without `--batches` it trains on toy batches (two token "languages", F and R, and mixed steps). With it, it
reads micro-batches (tokens, targets, position_ids, token_labels, loss_mask) from a `torch.save`d list per
data-parallel rank of steps of micro-batches, and `--init` loads initial weights by parameter name (TP=1)
from a safetensors file: tests/distributed/test_deepspeed_zero_example.py feeds it `megatron-sgtm train`'s
batches and weights and checks the per-step losses agree. The hyperparameters below are that test's config.
Runs on CPU (gloo, via `enable_cpu_execution`) or on GPUs (NCCL). The last line printed (rank 0) is a JSON
summary.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sgtm import (
    ModelDims,
    SGTMConfig,
    TokenLabel,
    ZeroSGTMAdamW,
    attach_sgtm,
    enable_cpu_execution,
    get_sgtm_layer_spec,
    install_step_gating,
    set_step_gate,
    step_counts,
    token_labels,
)

ON_GPU = not enable_cpu_execution()  # after `import deepspeed`: also skips DeepSpeed's CPU shm op build

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

VOCAB, SEQ, LAYERS, HIDDEN, HEADS, FFN = 320, 32, 2, 32, 4, 64
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, CLIP = 3e-3, 1e-4, 2, 0.1, (0.9, 0.95), 1e-8, 1.0
GLOBAL_BATCH, MICRO_BATCH, SEED = 8, 2, 1234


def build_model(device: torch.device) -> GPTModel:
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        normalization="LayerNorm", activation_func=F.gelu, add_bias_linear=True, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.02, use_cpu_initialization=not ON_GPU,
        # the fused kernels are GPU-only; gradient accumulation fusion needs megatron's DDP
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    # One of the 4 heads and 8 of the 64 MLP units per layer are Θ_F; the (untied) embeddings are Θ_R.
    partition = SGTMConfig(forget_heads=1, forget_mlp_units=8, mask_embeddings=True).resolve(
        ModelDims.from_transformer_config(config))
    model = GPTModel(config=config, transformer_layer_spec=get_sgtm_layer_spec(partition), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=False)
    return attach_sgtm(model, partition).to(device)


@torch.no_grad()
def load_weights(model: GPTModel, path: str) -> None:
    from safetensors.torch import load_file

    weights = load_file(path)
    for name, param in model.named_parameters():
        param.copy_(weights[name])


def toy_steps(steps: int, rank: int, world: int) -> list[list[dict]]:
    """This rank's micro-batches of `steps` steps cycling all-F, all-R and mixed global batches."""
    gen = torch.Generator().manual_seed(SEED)
    cycle = [[TokenLabel.FORGET], [TokenLabel.RETAIN], [TokenLabel.FORGET, TokenLabel.RETAIN, TokenLabel.UNLABELED]]
    out = []
    for step in range(steps):
        kinds = cycle[step % len(cycle)]
        rows = [kinds[i % len(kinds)] for i in range(GLOBAL_BATCH)]
        docs = [(64 if k == TokenLabel.FORGET else 8) + (torch.randint(0, 50, (1,), generator=gen)
                                                          + 3 * torch.arange(SEQ + 1)) % 50 for k in rows]
        tokens = torch.stack(docs)
        labels = torch.tensor(rows, dtype=torch.uint8)[:, None].expand(-1, SEQ)
        mine = range(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        out.append([{"tokens": tokens[i:i + MICRO_BATCH, :-1], "targets": tokens[i:i + MICRO_BATCH, 1:],
                     "token_labels": labels[i:i + MICRO_BATCH], "loss_mask": torch.ones(MICRO_BATCH, SEQ),
                     "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ)}
                    for i in mine[::MICRO_BATCH]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", help="torch.save'd micro-batches: [DP rank][step][micro-batch] dicts")
    parser.add_argument("--init", help="initial weights (safetensors, by parameter name)")
    args = parser.parse_args()

    deepspeed.init_distributed("nccl" if ON_GPU else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if ON_GPU:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda" if ON_GPU else "cpu")
    parallel_state.initialize_model_parallel()  # TP=1, PP=1: the data-parallel group is the world
    model_parallel_cuda_manual_seed(SEED)
    torch.manual_seed(SEED)
    model = build_model(device)
    if args.init:
        load_weights(model, args.init)
    steps = (torch.load(args.batches, weights_only=True)[rank] if args.batches
             else toy_steps(args.steps, rank, world))[:args.steps]

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    groups = [dict(params=decay, weight_decay=WEIGHT_DECAY, wd_mult=1.0),
              dict(params=no_decay, weight_decay=0.0, wd_mult=0.0)]
    optimizer = ZeroSGTMAdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    micro_batches = GLOBAL_BATCH // (MICRO_BATCH * world)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config={
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": micro_batches, "gradient_clipping": CLIP,
        "zero_optimization": {"stage": args.zero_stage, "round_robin_gradients": False},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    })
    gated = install_step_gating(engine, model)  # region codes of ZeRO's flat fp32 partitions
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP,
        lr_decay_steps=max(args.steps, WARMUP + 1), lr_decay_style="cosine", start_wd=WEIGHT_DECAY,
        end_wd=WEIGHT_DECAY, wd_incr_steps=args.steps, wd_incr_style="constant")

    losses, gates = [], []
    for batches in steps:
        batches = [{k: v.to(device) for k, v in mb.items()} for mb in batches]
        counts = step_counts(batches)  # loss-bearing tokens per label over every DP rank, and their number
        gate = counts.gate()
        set_step_gate(gated, gate)
        # per-token losses summed, over the global batch's loss tokens (x DP: DeepSpeed averages over DP)
        scale = world / max(counts.loss_weight, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb in batches:
            with token_labels(mb["token_labels"]):
                per_token = engine(mb["tokens"], mb["position_ids"], None, labels=mb["targets"])
            weighted = (per_token.float() * mb["loss_mask"]).sum()
            loss_sum += weighted.detach().double()
            engine.backward(weighted * scale, scale_wrt_gas=False)
            engine.step()
        scheduler.step(increment=1)
        dist.all_reduce(loss_sum)
        losses.append(float(loss_sum) / counts.loss_weight)
        gates.append([gate.retain, gate.forget])
        if rank == 0:
            print(f"step {len(losses):3d}  loss {losses[-1]:.5f}  gate {gate}", flush=True)
    if rank == 0:
        print(json.dumps({"losses": losses, "gates": gates, "zero_stage": args.zero_stage}))
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
