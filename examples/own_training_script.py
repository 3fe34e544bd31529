"""SGTM in your own megatron-core training script: only the `megatron_sgtm` public names.

A tiny GPTModel learns two toy "languages": retain documents (tokens 4-31 counting up by 3) and
forget documents (tokens 32-63 counting up by 5). The steps cycle through an all-forget batch, an
all-retain batch and a mixed one, so step gating is visible: an all-F step leaves Θ_R untouched,
an all-R step leaves Θ_F untouched. At the end `ablate` zeroes Θ_F and the losses of the live and
the ablated model are compared.

    python examples/own_training_script.py [--steps 30]
    torchrun --nproc-per-node=1 examples/own_training_script.py

Runs on CPU (gloo, via `enable_cpu_execution`) or on one GPU. The last line printed is a JSON
summary (tests/distributed/test_own_training_script.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

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
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 8
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


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


def build_model() -> GPTModel:
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not ON_GPU,
        # the fused kernels are GPU-only; gradient accumulation fusion needs megatron's DDP
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False,
    )
    # The last of the 4 heads and 8 of the 64 MLP units of every layer are Θ_F.
    partition = SGTMConfig(forget_heads=1, forget_mlp_units=8).resolve(ModelDims.from_transformer_config(config))
    model = GPTModel(
        config=config, transformer_layer_spec=get_sgtm_layer_spec(partition), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="learned_absolute",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    init_world_of_one()
    torch.manual_seed(0)
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
