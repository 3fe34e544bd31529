"""4-rank worker: SGTM layers at every TP x PP x SP layout, against the plain-torch reference.

For each (model variant, strategy, layout) it loads the same global weights, runs megatron's own
schedule (1F1B under PP) on micro-batches with mixed labels, finalizes grads through megatron DDP,
and records on rank 0: gathered gradients, per-token losses, F-only gradients, losses with
perturbed Θ_F / Θ_R, and the weights after `ablate()`. The pytest side does the comparisons.
With ``--bf16`` first, the models run as megatron trains in bf16: bf16 parameters in `Float16Module`,
fp32 `main_grad` buffers (tests/distributed/test_bf16.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sgtm.compat.cpu import enable_cpu_execution

enable_cpu_execution()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from megatron_sgtm.core.gating import region_codes  # noqa: E402
from megatron_sgtm.core.labels import token_labels  # noqa: E402
from megatron_sgtm.core.partition import SGTMConfig  # noqa: E402
from megatron_sgtm.core.regions import ablate, param_regions  # noqa: E402
from megatron_sgtm.core.strategy import Region  # noqa: E402
from megatron_sgtm.layout import gather_global, load_global  # noqa: E402
from megatron_sgtm.model import ModelConfig, build_gpt_model, resolve_partition  # noqa: E402
from tests.support.sgtm_cases import CASES, MBS, SEQ, make_batch, masks_for, perturb, random_global_state  # noqa: E402


def setup(tp: int, pp: int) -> None:
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)


def build(model_cfg: ModelConfig, sgtm: SGTMConfig, tp: int, pp: int, sp: bool, bf16: bool = False):
    config = model_cfg.transformer_config(
        on_gpu=False, bf16=bf16, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp
    )
    partition = resolve_partition(sgtm, model_cfg, tp)
    gpt = build_gpt_model(model_cfg, config, partition)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=Float16Module(config, gpt) if bf16 else gpt,
    )
    return gpt, ddp


def run(gpt, ddp, batch, loss_masks, forward_only=False):
    """One global batch through megatron's schedule; per-token losses of the last stage."""
    losses: list[torch.Tensor] = []
    micro = iter(zip(batch, loss_masks))

    def forward_step(_data_iterator, model):
        mb, loss_mask = next(micro)
        with token_labels(mb["labels"]):
            out = model(mb["tokens"], mb["position_ids"], mb["attn_mask"], labels=mb["targets"])

        def loss_func(per_token):
            losses.append(per_token.detach().clone())
            loss = (per_token * loss_mask).sum()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    ddp.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=None,
        model=[ddp],
        num_microbatches=len(batch),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=forward_only,
    )
    if not forward_only:
        finalize_model_grads([ddp])
    return torch.cat(losses) if losses else None


def last_stage_losses(losses):
    """Per-token losses from the first rank of the last pipeline stage, on every rank."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, losses)
    return next(x for x in everyone if x is not None)


def main(out_dir: str, *names: str) -> None:
    """`names`: the cases to run (all without), after an optional ``--bf16``."""
    bf16 = bool(names) and names[0] == "--bf16"
    names = names[1:] if bf16 else names
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict[str, torch.Tensor | float] = {}
    cases = [c for c in CASES if c.name in names] if names else CASES
    setup(1, 1)
    inputs = {}  # per case: the global weights, the batch, the forget and retain masks
    for case in cases:
        gpt, _ = build(case.model, case.sgtm, 1, 1, False)
        state = random_global_state(gather_global(gpt), seed=7)
        inputs[case.name] = (state, make_batch(case.model, SEQ, MBS, seed=11), *masks_for(case, state))
        if rank == 0:
            results.update({f"{case.name}/state/{k}": v for k, v in state.items()})
    # One parallel-state setup per (TP, PP) (creating megatron's process groups is the slow part), then every
    # case and SP setting at that layout.
    for tp, pp in dict.fromkeys((tp, pp) for case in cases for tp, pp, _ in case.layouts):
        setup(tp, pp)
        for case, sp in [(c, sp) for c in cases for t, p, sp in c.layouts if (t, p) == (tp, pp)]:
            state, batch, forget, retain = inputs[case.name]
            key = f"{case.name}/tp{tp}pp{pp}{'sp' if sp else ''}"
            gpt, ddp = build(case.model, case.sgtm, tp, pp, sp, bf16)
            load_global(gpt, state)
            ones = [torch.ones_like(mb["labels"], dtype=torch.float32) for mb in batch]
            losses = last_stage_losses(run(gpt, ddp, batch, ones))
            grads = gather_global(gpt, {n: p.main_grad for n, p in gpt.named_parameters()})
            only_f = [(mb["labels"] == 2).float() for mb in batch]
            run(gpt, ddp, batch, only_f)
            f_grads = gather_global(gpt, {n: p.main_grad for n, p in gpt.named_parameters()})
            base = last_stage_losses(run(gpt, ddp, batch, ones, forward_only=True))
            load_global(gpt, perturb(state, forget, seed=3))
            pert_f = last_stage_losses(run(gpt, ddp, batch, ones, forward_only=True))
            load_global(gpt, perturb(state, retain, seed=4, split_only=forget))
            pert_r = last_stage_losses(run(gpt, ddp, batch, ones, forward_only=True))
            regions = param_regions(gpt)
            codes = {n: p.new_full(p.shape, Region.JOINT) if (c := region_codes(regions[n], p)) is None else c.float()
                     for n, p in gpt.named_parameters()}
            codes = gather_global(gpt, codes)
            load_global(gpt, state)
            ablate(gpt)
            ablated = gather_global(gpt)
            if rank == 0:
                results[f"{key}/losses"] = losses
                results[f"{key}/base"] = base
                results[f"{key}/pert_f"] = pert_f
                results[f"{key}/pert_r"] = pert_r
                for name in state:
                    results[f"{key}/grad/{name}"] = grads[name]
                    results[f"{key}/fgrad/{name}"] = f_grads[name]
                    results[f"{key}/ablated/{name}"] = ablated[name]
                    results[f"{key}/codes/{name}"] = codes[name].to(torch.uint8)
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
