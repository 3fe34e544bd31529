"""Engine ``megatron``: GPTModel with the SGTM spec under megatron DDP + DistributedOptimizer.

The 1F1B schedule (or the no-pipelining one at PP=1) runs the micro-batches; losses are summed per
token and normalised by the global batch's token count (``calculate_per_token_loss``), so every
layout computes the same update. Step gating is the public hook `install_step_gating`: the DistributedOptimizer's
inner optimizer becomes `SGTMAdamW` with the region code of every element of the shard this rank owns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import Float16Module, param_is_not_shared

from megatron_sgtm.compat.megatron_optimizer import load_fully_reshardable
from megatron_sgtm.core.collectives import all_reduce_host
from megatron_sgtm.core.gating import Gate
from megatron_sgtm.core.optimizer_hooks import install_step_gating, set_step_gate
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.regions import param_regions
from megatron_sgtm.training.config import TrainConfig
from megatron_sgtm.training.engine import Engine


def ddp_config(cfg: TrainConfig) -> DistributedDataParallelConfig:
    """megatron DDP with the DistributedOptimizer, fp32 gradient reduction and the config's overlap knobs."""
    par = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
    )


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg: TrainConfig, partition: Partition | None, on_gpu: bool,
                 weights: dict[str, torch.Tensor] | None = None):
        super().__init__(cfg, partition, on_gpu, bf16=cfg.train.bf16, weights=weights,
                         sequence_parallel=cfg.parallel.sequence_parallel, calculate_per_token_loss=True)
        # bf16 as megatron's trainer runs it: Float16Module casts the parameters it does not build in bf16 (the
        # position embedding) and the first stage's inputs; the DistributedOptimizer keeps fp32 main params and grads.
        module = Float16Module(self.config, self.model) if cfg.train.bf16 else self.model
        self.wrapped = self.ddp = DistributedDataParallel(config=self.config, ddp_config=ddp_config(cfg),
                                                          module=module)
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
                adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, use_distributed_optimizer=True,
                bf16=cfg.train.bf16, params_dtype=self.config.params_dtype,
            ),
            [self.ddp],
        )
        self.inner_optimizers = install_step_gating(self.optimizer, self.model)
        self.start_schedule()
        self.config.no_sync_func = self.ddp.no_sync
        if cfg.parallel.overlap_grad_reduce:  # the schedules launch the last micro-batch's reduce (as megatron's)
            self.config.grad_sync_func = self.ddp.start_grad_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.is_last_stage = ps.is_pipeline_last_stage()

    # -- micro-batches through megatron's schedule -------------------------------------------
    def _run(self, batches: list[dict], forward_only: bool, use_labels: bool,
             token_losses: list | None = None, force_all_reduce: bool = False) -> tuple[float, float]:
        micro = iter(batches)

        def forward_step(_data_iterator, model):
            mb = next(micro)
            out = self._forward(model, mb, use_labels)

            def loss_func(per_token: torch.Tensor):
                mask = mb["loss_mask"]
                loss = (per_token.float() * mask).sum()
                if token_losses is not None:
                    token_losses.append(per_token.detach().float()[mask > 0].cpu())
                tokens = mask.sum().to(torch.int)
                return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}

            return out, loss_func

        s, b = self.cfg.model.seq_length, self.cfg.optim.micro_batch_size
        seq_length, micro_batch_size = (s * b, 1) if self.packs_sequences else (s, b)
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=None,
            model=[self.ddp],
            num_microbatches=len(batches),
            seq_length=seq_length,  # of the [s, b, h] activations between pipeline stages
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
            force_all_reduce=force_all_reduce,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed on the device, read once
        if self.is_last_stage:
            for item in out:
                total += item["lm loss"].double()
        dist.all_reduce(total)  # every rank: (loss sum, tokens) over DP replicas, counted once per TP/PP
        tp = ps.get_tensor_model_parallel_world_size()
        loss_sum, tokens = total.tolist()
        return loss_sum / tp, tokens / tp

    def _optimizer_step(self, batches: list[dict], gate: Gate, loss_weight: float) -> tuple[float, float, float]:
        set_step_gate(self.inner_optimizers, gate)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_sum, tokens = self._run(batches, forward_only=False, use_labels=True)
        _, grad_norm, _ = self.optimizer.step()
        return loss_sum, tokens, grad_norm

    def _forward_only(self, batches: list[dict], token_losses: list | None = None) -> tuple[float, float]:
        return self._run(batches, forward_only=True, use_labels=False, token_losses=token_losses)

    def relative_grad_norms(self, mb: dict) -> tuple[float, float]:
        """(‖∇Θ_F‖/‖Θ_F‖, ‖∇Θ_R‖/‖Θ_R‖) of the live model without labels (no routing) on one micro-batch, the
        gradient of its mean token loss; every DP rank passes the same micro-batch. Nothing is updated."""
        self.ddp.zero_grad_buffer()
        self.wrapped.eval()
        # finalize: ÷ tokens over DP ranks, all-reduced (a DistributedOptimizer's reduce-scatter would leave every
        # rank the reduced gradient only in its own shard, the rest its local share)
        self.ddp.force_all_reduce = True
        try:
            self._run(self._to_device([mb]), forward_only=False, use_labels=False, force_all_reduce=True)
        finally:
            self.ddp.force_all_reduce = False
        self.wrapped.train()
        sums = torch.zeros(4, dtype=torch.float64)  # Σ grad² and Σ θ² over Θ_F, then over Θ_R
        for (_, region), param in zip(param_regions(self.model).items(), self.model.parameters()):
            if not (param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)):
                continue  # counted where it is owned: once over TP ranks and tied pipeline stages
            grad, value = param.main_grad.detach().double(), param.detach().double()
            for k, mask in enumerate((region.forget_mask(param), region.retain_mask(param))):
                sums[2 * k] += grad[mask].square().sum().cpu()
                sums[2 * k + 1] += value[mask].square().sum().cpu()
        sums = all_reduce_host(sums, group=ps.get_model_parallel_group())
        self.ddp.zero_grad_buffer()
        ratio = (sums[0::2] / sums[1::2].clamp_min(1e-30)).sqrt()
        return float(ratio[0]), float(ratio[1])

    def load_weights(self, directory: str) -> None:
        """The model weights of a megatron training checkpoint of any layout (resharded to this one); the
        optimizer keeps its fresh state (collective)."""
        state = dist_checkpointing.load({"model": self.model.sharded_state_dict()}, directory)
        self.model.load_state_dict(state["model"])

    @contextlib.contextmanager
    def _params_gathered(self) -> Iterator[None]:
        """With overlap_param_gather the step's new parameters arrive in the next forward's pre-hooks; what
        reads or edits them otherwise (ablation, checkpoints) gathers them first, as megatron's trainer does."""
        if not self.ddp.ddp_config.overlap_param_gather:
            yield
            return
        self.ddp.disable_forward_pre_hook()
        try:
            yield
        finally:
            self.ddp.enable_forward_pre_hook()

    @contextlib.contextmanager
    def _ablated(self) -> Iterator[None]:
        with self._params_gathered(), super()._ablated():
            yield

    # -- checkpoints: megatron distributed checkpoints, reshardable to any layout ------------
    def _sharded_state_dict(self, is_loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata),
        }

    def save(self, directory: str) -> None:
        with self._params_gathered():
            dist_checkpointing.save(self._sharded_state_dict(is_loading=False), directory)

    def load(self, directory: str, meta: dict | None = None) -> None:
        """Load a (possibly differently laid out: the distributed checkpoint reshards) checkpoint into the gated
        inner optimizers."""
        for opt in self.inner_optimizers:
            opt.init_state()
        state = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), directory)
        self.model.load_state_dict(state["model"])
        load_fully_reshardable(self.optimizer, state["optimizer"])
