"""Engine ``megatron``: GPTModel with the SGTM spec under megatron DDP + DistributedOptimizer.

The 1F1B schedule (or the no-pipelining one at PP=1) runs the micro-batches; losses are summed per
token and normalised by the global batch's token count (``calculate_per_token_loss``), so every
layout computes the same update. Step gating lives in the DistributedOptimizer's inner optimizer:
`SGTMAdamW` gets the region code of every element of the shard this rank owns.
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
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_sgtm.data.sampler import document_attention_mask
from megatron_sgtm.labels import token_labels
from megatron_sgtm.model import build_gpt_model
from megatron_sgtm.partition import Partition
from megatron_sgtm.regions import ablated, param_regions
from megatron_sgtm.training.checkpoint import init_weights
from megatron_sgtm.training.config import TrainConfig
from megatron_sgtm.training.gating import Gate, SGTMAdamW, region_codes_for_shard, step_metrics


class MegatronEngine:
    name = "megatron"

    def __init__(self, cfg: TrainConfig, partition: Partition | None, on_gpu: bool):
        par = cfg.parallel
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        )
        model_parallel_cuda_manual_seed(cfg.train.seed)
        self.cfg, self.partition = cfg, partition
        self.config = cfg.model.transformer_config(
            on_gpu=on_gpu,
            bf16=cfg.train.bf16,
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            sequence_parallel=par.sequence_parallel,
            calculate_per_token_loss=True,
        )
        self.model = build_gpt_model(cfg.model, self.config, partition, backend="gpu" if on_gpu else "local")
        init_weights(self.model, cfg)
        if on_gpu:
            self.model.cuda()
        self.ddp = DistributedDataParallel(
            config=self.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
            ),
            module=self.model,
        )
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
                adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, use_distributed_optimizer=True,
                bf16=cfg.train.bf16, params_dtype=self.config.params_dtype,
            ),
            [self.ddp],
        )
        self.inner_optimizers = self._install_gating()
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(cfg.train.train_steps, o.warmup_steps + 1), lr_decay_style="cosine",
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.train_steps,
            wd_incr_style="constant",
        )
        self.config.no_sync_func = self.ddp.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.output_bias = None  # set while a calibrated evaluation runs (training/calibration.py)

    def _install_gating(self) -> list[SGTMAdamW]:
        """Swap each DistributedOptimizer's inner AdamW for SGTMAdamW with shard region codes."""
        regions = {id(p): r for p, r in zip(self.model.parameters(), param_regions(self.model).values())}
        installed = []
        for dist_opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = dist_opt.optimizer
            o = self.cfg.optim
            gated = SGTMAdamW([torch.nn.Parameter(torch.zeros(1))], lr=o.lr, betas=(o.beta1, o.beta2),
                              eps=o.eps, weight_decay=o.weight_decay)
            # The shard params are views megatron swapped in past add_param_group; take its groups as is.
            gated.param_groups = inner.param_groups
            gated.state = inner.state
            pairs = [
                *zip(dist_opt.model_float16_groups, dist_opt.shard_fp32_from_float16_groups),
                *zip(dist_opt.model_fp32_groups, dist_opt.shard_fp32_groups),
            ]
            for model_group, shard_group in pairs:
                for model_param, shard_param in zip(model_group, shard_group):
                    span = dist_opt._get_model_param_range_map(model_param)["param"]
                    codes = region_codes_for_shard(regions[id(model_param)], model_param, span.start, span.end)
                    gated.set_region_codes(shard_param, codes)
            dist_opt.optimizer = gated
            installed.append(gated)
        return installed

    # -- one optimizer step ------------------------------------------------------------------
    def _attention_mask(self, mb: dict) -> torch.Tensor | None:
        return document_attention_mask(mb["position_ids"]) if self.cfg.data.document_attention else None

    def _forward_step(self, micro: Iterator[dict], use_labels: bool):
        def forward_step(_data_iterator, model):
            mb = next(micro)
            labels = mb["token_labels"] if use_labels else None
            if self.output_bias is not None:
                self.output_bias.observe(mb["loss_mask"])
            with token_labels(labels):
                out = model(mb["tokens"], mb["position_ids"], self._attention_mask(mb), labels=mb["labels"])

            def loss_func(per_token: torch.Tensor):
                mask = mb["loss_mask"]
                loss = (per_token.float() * mask).sum()
                tokens = mask.sum().to(torch.int)
                return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}

            return out, loss_func

        return forward_step

    def _to_device(self, batches: list[dict]) -> list[dict]:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return [{k: v.to(device) for k, v in mb.items()} for mb in batches]

    def _global_counts(self, batches: list[dict]) -> torch.Tensor:
        """Loss-bearing tokens per label (U, R, F) in the global batch."""
        counts = torch.zeros(3, dtype=torch.float64)
        for mb in batches:
            keep = mb["loss_mask"] > 0
            counts += torch.bincount(mb["token_labels"][keep].long().cpu(), minlength=3)[:3].double()
        dist.all_reduce(counts, group=self.dp_group)
        return counts

    def _run(self, batches: list[dict], forward_only: bool, use_labels: bool) -> tuple[float, float]:
        micro = iter(batches)
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step(micro, use_labels),
            data_iterator=None,
            model=[self.ddp],
            num_microbatches=len(batches),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.optim.micro_batch_size,
            forward_only=forward_only,
        )
        total = torch.zeros(2, dtype=torch.float64)
        if self.is_last_stage:
            for item in out:
                total += item["lm loss"].double().cpu()
        dist.all_reduce(total)  # every rank: (loss sum, tokens) over DP replicas, counted once per TP/PP
        tp = ps.get_tensor_model_parallel_world_size()
        return float(total[0]) / tp, float(total[1]) / tp

    def train_step(self, batches: list[dict]) -> dict:
        batches = self._to_device(batches)
        counts = self._global_counts(batches)
        gate = Gate.from_label_counts(counts) if self.cfg.strategy == "sgtm" else Gate()
        for opt in self.inner_optimizers:
            opt.gate = gate
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_sum, tokens = self._run(batches, forward_only=False, use_labels=True)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return step_metrics(loss_sum, tokens, grad_norm, self.optimizer.param_groups[0]["lr"], counts, gate)

    @torch.no_grad()
    def evaluate(self, batches: list[dict], ablate: bool = False) -> tuple[float, float]:
        """(loss sum, tokens) of a forward pass without labels, of the live or the ablated model."""
        self.ddp.eval()
        context = ablated(self.model) if ablate else contextlib.nullcontext()
        with context:
            result = self._run(self._to_device(batches), forward_only=True, use_labels=False)
        self.ddp.train()
        return result

    # -- checkpoints -------------------------------------------------------------------------
    def _sharded_state_dict(self, is_loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata),
        }

    def save(self, directory: str) -> None:
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), directory)

    def load(self, directory: str) -> None:
        """Load a (possibly differently laid out) checkpoint.

        megatron 0.16's torch-Adam path describes the inner state through a per-parameter 'step'
        but then copies every per-parameter entry from the checkpoint, which stores no 'step'; so
        the non-tensor state is loaded first and the reshardable parameter state without 'step'.
        """
        for opt in self.inner_optimizers:
            opt.init_state()
        state = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), directory)
        self.model.load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        param_state = optimizer_state.pop("param_state")
        optimizer_state.pop("param_state_sharding_type")
        self.optimizer.load_state_dict(optimizer_state)
        (dist_opt,) = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        steps = {p: s.pop("step") for p, s in dist_opt.optimizer.state.items() if "step" in s}
        dist_opt.load_parameter_state_from_fully_reshardable(param_state)
        for param, step in steps.items():
            dist_opt.optimizer.state[param]["step"] = step

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def shutdown(self) -> None:
        ps.destroy_model_parallel()
