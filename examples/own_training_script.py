"""SGTM in your own megatron-core training script: only the `megatron_sgtm` public names.

A tiny GPTModel learns two toy "languages": retain documents (tokens 4-31 counting up by 3) and
forget documents (tokens 32-63 counting up by 5). The steps cycle through an all-forget batch, an
all-retain batch and a mixed one, so step gating is visible: an all-F step leaves Θ_R untouched,
an all-R step leaves Θ_F untouched. At the end `ablate` zeroes Θ_F and the losses of the live and
the ablated model are compared.

    python examples/own_training_script.py [--steps 30]
    torchrun --nproc-per-node=1 examples/own_training_script.py
    python examples/own_training_script.py --init model.safetensors --batches b.pt --steps 20

With `--init` and `--batches` (as examples/deepspeed_zero.py's: initial weights by parameter name from a
safetensors file, and a `torch.save`d list per data-parallel rank, of steps, of micro-batches) it trains instead
an untied model with Θ_R embeddings (its vocabulary and sequence length those of the weights) on the given
batches: per-token losses summed over the step's micro-batches and divided by its loss tokens, gradients clipped
at norm 1, megatron's warmup/cosine `OptimizerParamScheduler`, the hyperparameters below.
tests/distributed/test_own_training_script.py feeds it `megatron-sgtm train`'s batches and weights and checks
the per-step losses agree.

Runs on CPU (gloo, via `enable_cpu_execution`) or on one GPU. The last line printed is a JSON
summary (tests/distributed/test_own_training_script.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_sgtm import (
    ModelDims,
    SGTMAdamW,
    SGTMConfig,
    TokenLabel,
    ablate,
    attach_sgtm,
    enable_cpu_execution,
    get_sgtm_layer_spec,
    install_step_gating,
    param_regions,
    set_step_gate,
    step_gate,
    token_labels,
)

ON_GPU = not enable_cpu_execution()  # on a machine without CUDA: megatron-core on the CPU (shims), before it runs

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 8
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# --init/--batches: the hyperparameters of tests/distributed/test_own_training_script.py's train config
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, CLIP = 3e-3, 1e-4, 2, 0.1, (0.9, 0.95), 1e-8, 1.0


def init_world_of_one() -> None:
    """A process group of one (torchrun's, or a local one for plain `python`) and megatron's parallel state."""
    if "RANK" not in os.environ:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("nccl" if ON_GPU else "gloo")
    if dist.get_world_size() != 1:
        raise SystemExit("this example trains on one process (no data parallelism)")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)


def build_model(vocab: int = VOCAB, seq: int = SEQ, untied: bool = False) -> GPTModel:
    """The toy model (tied embeddings), or with `untied` separate input and output embeddings, both Θ_R."""
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not ON_GPU,
        # the fused kernels are GPU-only; gradient accumulation fusion needs megatron's DDP
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False,
    )
    # The last of the 4 heads and 8 of the 64 MLP units of every layer are Θ_F.
    partition = SGTMConfig(forget_heads=1, forget_mlp_units=8, mask_embeddings=untied).resolve(
        ModelDims.from_transformer_config(config))
    model = GPTModel(
        config=config, transformer_layer_spec=get_sgtm_layer_spec(partition), vocab_size=vocab,
        max_sequence_length=seq, position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=not untied,
    )
    return attach_sgtm(model, partition).to(DEVICE)  # the model's partition (and embedding masks, if it masks them)


def documents(kind: TokenLabel, n: int, gen: torch.Generator) -> torch.Tensor:
    """n documents of SEQ + 1 tokens in the retain or the forget toy language."""
    low, size, stride = (32, 32, 5) if kind == TokenLabel.FORGET else (4, 28, 3)
    start = torch.randint(0, size, (n, 1), generator=gen)
    return low + (start + stride * torch.arange(SEQ + 1)) % size


def batch(kinds: list[TokenLabel], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One row per kind; every token of a row carries its document's label (UNLABELED: retain text, unlabelled)."""
    docs = torch.cat([documents(TokenLabel.FORGET if k == TokenLabel.FORGET else TokenLabel.RETAIN, 1, gen)
                      for k in kinds])
    labels = torch.tensor([[int(k)] * SEQ for k in kinds], dtype=torch.uint8)
    return {"tokens": docs[:, :-1], "targets": docs[:, 1:], "token_labels": labels,
            "loss_mask": torch.ones(len(kinds), SEQ)}


def loss(model: GPTModel, b: dict[str, torch.Tensor], labelled: bool = True) -> torch.Tensor:
    tokens, targets = b["tokens"].to(DEVICE), b["targets"].to(DEVICE)
    positions = torch.arange(SEQ, device=DEVICE).expand_as(tokens)
    with token_labels(b["token_labels"].to(DEVICE) if labelled else None):  # the masked layers read them in forward
        per_token = model(tokens, positions, None, labels=targets)  # attention_mask None: causal
    return per_token.float().mean()


def snapshot(model: GPTModel, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach()[masks[name]].clone() for name, p in model.named_parameters()}


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max((a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(after.values(), before.values()))


def train_on_batches(init: str, batches: str, steps: int) -> None:
    """Train from `init`'s weights on the first data-parallel rank's micro-batches of `batches`."""
    weights = load_file(init)
    vocab = weights["embedding.word_embeddings.weight"].shape[0]
    model = build_model(vocab, weights["embedding.position_embeddings.weight"].shape[0], untied=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    optimizer = SGTMAdamW([dict(params=decay, weight_decay=WEIGHT_DECAY, wd_mult=1.0),
                           dict(params=no_decay, weight_decay=0.0, wd_mult=0.0)],
                          lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    gated = install_step_gating(optimizer, model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP,
        lr_decay_steps=max(steps, WARMUP + 1), lr_decay_style="cosine", start_wd=WEIGHT_DECAY,
        end_wd=WEIGHT_DECAY, wd_incr_steps=steps, wd_incr_style="constant")

    losses, gates = [], []
    for step_batches in torch.load(batches, weights_only=True)[0][:steps]:
        step_batches = [{k: v.to(DEVICE) for k, v in mb.items()} for mb in step_batches]
        gate = step_gate(step_batches)
        set_step_gate(gated, gate)
        optimizer.zero_grad()
        loss_tokens = sum(float(mb["loss_mask"].sum()) for mb in step_batches)
        loss_sum = 0.0
        for mb in step_batches:  # per-token losses summed, over the step's loss tokens
            with token_labels(mb["token_labels"]):
                per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["targets"])
            weighted = (per_token.float() * mb["loss_mask"]).sum()
            (weighted / max(loss_tokens, 1.0)).backward()
            loss_sum += weighted.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step(increment=1)
        losses.append(loss_sum / loss_tokens)
        gates.append([gate.retain, gate.forget])
        print(f"step {len(losses):3d}  loss {losses[-1]:.5f}  gate {gate}", flush=True)
    print(json.dumps({"losses": losses, "gates": gates}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", help="torch.save'd micro-batches: [DP rank][step][micro-batch] dicts")
    parser.add_argument("--init", help="initial weights (safetensors, by parameter name)")
    args = parser.parse_args()
    if (args.init is None) != (args.batches is None):
        parser.error("--init and --batches go together")
    init_world_of_one()
    torch.manual_seed(0)
    if args.batches:
        train_on_batches(args.init, args.batches, args.steps)
        dist.destroy_process_group()
        return
    model = build_model()

    optimizer = SGTMAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    gated = install_step_gating(optimizer, model)  # the region codes of every parameter
    regions = param_regions(model)
    forget = {name: regions[name].forget_mask(p) for name, p in model.named_parameters()}
    retain = {name: regions[name].retain_mask(p) for name, p in model.named_parameters()}

    gen = torch.Generator().manual_seed(0)
    F, R, U = TokenLabel.FORGET, TokenLabel.RETAIN, TokenLabel.UNLABELED
    cycle = [("all-F", [F] * BATCH), ("all-R", [R] * BATCH), ("mixed", [F, F, R, R, R, U, U, U])]
    losses, frozen_moved = [], {"retain on all-F steps": 0.0, "forget on all-R steps": 0.0}
    for step in range(args.steps):
        kind, kinds = cycle[step % len(cycle)]
        b = batch(kinds, gen)
        # The gate from the loss-bearing labels of the step's micro-batches (all-reduced over data-parallel ranks).
        set_step_gate(gated, step_gate([b]))
        before_r, before_f = snapshot(model, retain), snapshot(model, forget)
        optimizer.zero_grad()
        value = loss(model, b)
        value.backward()
        optimizer.step()
        if optimizer.gate.retain:
            frozen_moved["retain on all-F steps"] = max(frozen_moved["retain on all-F steps"],
                                                         max_change(before_r, snapshot(model, retain)))
        if optimizer.gate.forget:
            frozen_moved["forget on all-R steps"] = max(frozen_moved["forget on all-R steps"],
                                                         max_change(before_f, snapshot(model, forget)))
        losses.append(value.item())
        print(f"step {step + 1:3d}  {kind:5s}  loss {value.item():.4f}  gate {optimizer.gate}")

    model.eval()
    eval_gen = torch.Generator().manual_seed(1)
    forget_batch, retain_batch = batch([F] * BATCH, eval_gen), batch([R] * BATCH, eval_gen)
    with torch.no_grad():
        live = {"forget": loss(model, forget_batch, labelled=False).item(),
                "retain": loss(model, retain_batch, labelled=False).item(),
                "retain (R labels)": loss(model, retain_batch).item()}
        zeroed = ablate(model)
        after = {"forget": loss(model, forget_batch, labelled=False).item(),
                 "retain": loss(model, retain_batch, labelled=False).item(),
                 "retain (R labels)": loss(model, retain_batch).item()}
    forget_left = max(p.detach()[forget[name]].abs().max().item() if forget[name].any() else 0.0
                      for name, p in model.named_parameters())
    for name in live:
        print(f"{name:18s} loss: live {live[name]:.4f}  ablated {after[name]:.4f}")
    print(f"ablate zeroed {zeroed} Θ_F elements; largest |Θ_F| left: {forget_left}")
    print(f"largest change of a gated region: {frozen_moved}")
    print(json.dumps({"losses": losses, "live": live, "ablated": after, "zeroed": zeroed, "forget_left": forget_left,
                      "frozen_moved": frozen_moved}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
