"""Engine ``deepspeed``: the SGTM GPTModel (megatron-core TP layers, PP=1) under DeepSpeed ZeRO 1/2/3.

The model is built exactly as for the megatron engine (megatron's parallel state provides the TP
groups; DeepSpeed gets them through `mpu`, so its data-parallel group is megatron's). The client
optimizer is `ZeroSGTMAdamW`; DeepSpeed flattens, partitions and steps it, and the public hook
`install_step_gating(engine, model)` gives it the region codes of the flat fp32 partitions this rank owns
(their layout: `compat.deepspeed.layout_partitions`).

Micro-batch losses are per-token sums divided by the global batch's loss-token count (times the
DP size, since DeepSpeed averages gradients over DP), so updates equal the megatron engine's.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sgtm.atomic import building
from megatron_sgtm.compat.deepspeed import skip_cpu_shm_comm_build, to_universal, universal_loads, weights_only_loads
from megatron_sgtm.core.gating import Gate, ZeroSGTMAdamW
from megatron_sgtm.core.optimizer_hooks import install_step_gating, set_step_gate
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.regions import ablate, sgtm_linears
from megatron_sgtm.training.config import TrainConfig
from megatron_sgtm.training.engine import Engine

CHECKPOINT_TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"  # its universal conversion, made in the checkpoint on resume at another DP size


class _MegatronMPU:
    """megatron-core's parallel state in the shape DeepSpeed's `mpu` argument expects (PP=1)."""

    get_data_parallel_group = staticmethod(lambda: ps.get_data_parallel_group())
    get_data_parallel_rank = staticmethod(lambda: ps.get_data_parallel_rank())
    get_data_parallel_world_size = staticmethod(lambda: ps.get_data_parallel_world_size())
    get_tensor_model_parallel_group = staticmethod(lambda: ps.get_tensor_model_parallel_group())
    get_tensor_model_parallel_rank = staticmethod(lambda: ps.get_tensor_model_parallel_rank())
    get_tensor_model_parallel_world_size = staticmethod(lambda: ps.get_tensor_model_parallel_world_size())
    get_tensor_model_parallel_src_rank = staticmethod(lambda: ps.get_tensor_model_parallel_src_rank())
    # With PP=1 the model-parallel group is the tensor-parallel group.
    get_model_parallel_group = staticmethod(lambda: ps.get_tensor_model_parallel_group())
    get_model_parallel_rank = staticmethod(lambda: ps.get_tensor_model_parallel_rank())
    get_model_parallel_world_size = staticmethod(lambda: ps.get_tensor_model_parallel_world_size())
    get_pipeline_model_parallel_group = staticmethod(lambda: ps.get_pipeline_model_parallel_group())
    get_pipeline_model_parallel_world_size = staticmethod(lambda: ps.get_pipeline_model_parallel_world_size())

    @staticmethod
    def get_data_parallel_group_ranks():
        return dist.get_process_group_ranks(ps.get_data_parallel_group())


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig, on_gpu: bool, dp_size: int) -> dict:
    """DeepSpeed's config dict: ours, with the user JSON's zero_optimization/optimizer sections winning."""
    par, o = cfg.parallel, cfg.optim
    zero: dict = {"stage": par.zero_stage, "round_robin_gradients": False}
    if par.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    user: dict = {}
    if par.deepspeed_config:
        user = json.loads(Path(par.deepspeed_config).read_text())
    if "optimizer" in user:
        raise ValueError(
            f"parallel.deepspeed_config={par.deepspeed_config}: an 'optimizer' section is not supported by "
            "engine=deepspeed (step gating needs the SGTMAdamW client optimizer; set optim.* instead)"
        )
    zero = _merge(zero, user.get("zero_optimization", {}))
    zero["stage"] = int(zero.get("stage", par.zero_stage))
    if zero["stage"] not in (1, 2, 3):
        raise ValueError(f"zero_optimization.stage={zero['stage']}: engine=deepspeed runs ZeRO stage 1, 2 or 3")
    micro_batches = o.global_batch_size // (o.micro_batch_size * dp_size)
    return {
        "train_batch_size": o.global_batch_size,
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload steps the SGTMAdamW client optimizer on the CPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def saved_layout(meta: dict) -> tuple[int, int, int]:
    """(data-parallel size, TP size, ZeRO stage) a DeepSpeed checkpoint was saved at, from its meta.json."""
    par = meta["config"]["parallel"]
    tp = par["tensor_model_parallel_size"]
    return meta["world_size"] // (tp * par["pipeline_model_parallel_size"]), tp, par["zero_stage"]


def check_resume_layout(path: Path, meta: dict, dp_size: int, tp_size: int) -> None:
    """Refuse, by the checkpoint's meta.json and before DeepSpeed is started, a layout DeepSpeed 0.19 cannot
    continue: model states are per TP rank, so only the saved TP size; another data-parallel size only through
    DeepSpeed's universal checkpoint (`load`), which we convert to for ZeRO-1/2 at TP=1 (its TP reshaping needs
    parameter patterns megatron-core's layers do not declare, and ZeRO-3's conversion is not tested here)."""
    from megatron_sgtm.training.checkpoint import CheckpointError

    if meta.get("engine") != "deepspeed":
        raise CheckpointError(f"{path}: a {meta.get('engine')} engine checkpoint; engine=deepspeed resumes only "
                              "its own checkpoints")
    saved_dp, saved_tp, stage = saved_layout(meta)
    if saved_tp != tp_size or (saved_dp != dp_size and (tp_size != 1 or stage not in (1, 2))):
        raise CheckpointError(f"{path}: saved by engine=deepspeed at data-parallel size {saved_dp} (TP {saved_tp}, "
                              f"ZeRO-{stage}); it resumes at another data-parallel size only with TP 1 and ZeRO-1/2, "
                              f"and never at another TP size, so not at data-parallel size {dp_size} (TP {tp_size}) "
                              "(engine=megatron checkpoints resume at any layout)")


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, partition: Partition | None, on_gpu: bool):
        if not on_gpu:
            skip_cpu_shm_comm_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        super().__init__(cfg, partition, on_gpu, bf16=cfg.train.bf16)

        self.named = dict(self.model.named_parameters())
        self.model_shape = {name: tuple(p.shape) for name, p in self.named.items()}  # ZeRO-3 empties .shape

        o = cfg.optim
        decay, no_decay = [], []
        for name, param in self.named.items():
            if param.requires_grad:
                (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
        # wd_mult: the scheduler sets every group's weight decay to optim.weight_decay x wd_mult.
        groups = [dict(params=p, weight_decay=o.weight_decay * m, wd_mult=m)
                  for p, m in ((decay, 1.0), (no_decay, 0.0)) if p]
        self.optimizer = ZeroSGTMAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                       weight_decay=o.weight_decay)
        self.ds_config = deepspeed_config(cfg, on_gpu, self.dp_size)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.wrapped = self.engine = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=self.ds_config, mpu=_MegatronMPU,
            dist_init_required=False,
        )[0]
        if self.zero_stage == 3 and cfg.model.tie_embeddings:
            # The output layer reads the word embedding that the embedding module owns.
            deepspeed.zero.register_external_parameter(self.model.output_layer,
                                                       self.model.embedding.word_embeddings.weight)
        self.micro_batches = self.ds_config["gradient_accumulation_steps"]
        self.start_schedule()
        install_step_gating(self.engine, self.model)

    # -- one optimizer step: DeepSpeed's forward/backward/step per micro-batch ---------------
    def _optimizer_step(self, batches: list[dict], gate: Gate, loss_weight: float) -> tuple[torch.Tensor, float, float]:
        if len(batches) != self.micro_batches:
            raise ValueError(f"train_step got {len(batches)} micro-batches; DeepSpeed was configured for "
                             f"{self.micro_batches} (global_batch_size / (micro_batch_size x DP))")
        set_step_gate([self.optimizer], gate)
        # DeepSpeed averages gradients over DP; the per-token normalisation wants their sum.
        scale = self.dp_size / max(loss_weight, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # read on the host once per step
        for mb in batches:
            per_token = self._forward(self.engine, mb, use_labels=True)
            weighted = (per_token.float() * mb["loss_mask"]).sum()
            loss_sum += weighted.detach().double()
            self.engine.backward(weighted * scale, scale_wrt_gas=False)
            self.engine.step()
        dist.all_reduce(loss_sum, group=self.dp_group)
        return loss_sum, loss_weight, self.engine.get_global_grad_norm()

    def _forward_only(self, batches: list[dict], token_losses: list | None = None) -> tuple[float, float]:
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # read on the host once
        for mb in batches:
            per_token = self._forward(self.engine, mb, use_labels=False)
            if token_losses is not None:
                token_losses.append(per_token.detach().float()[mb["loss_mask"] > 0].cpu())
            total[0] += (per_token.float() * mb["loss_mask"]).sum().double()
            total[1] += mb["loss_mask"].double().sum()
        dist.all_reduce(total, group=self.dp_group)
        loss_sum, tokens = total.tolist()
        return loss_sum, tokens

    @contextlib.contextmanager
    def _ablated(self):
        """Θ_F := 0 for the duration; under ZeRO-3 through gathered (then re-partitioned) parameters."""
        if self.zero_stage != 3:
            with super()._ablated():
                yield
            return
        import deepspeed

        params = [p for linear in sgtm_linears(self.model) for p in (linear.weight, linear.bias) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            saved = [p.detach().clone() for p in params]
            ablate(self.model)
        try:
            yield
        finally:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)

    # -- checkpoints: DeepSpeed's own format -------------------------------------------------
    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: str, meta: dict | None = None) -> None:
        """At the saved data-parallel size DeepSpeed's own checkpoint; at another one (read from `meta`) its
        universal form (ZeRO states merged per parameter, re-partitioned on load), converted once into
        ``UNIVERSAL_TAG`` next to it. Without `meta`, a save of this layout."""
        saved_dp = saved_layout(meta)[0] if meta is not None else self.dp_size
        tag, loads = CHECKPOINT_TAG, weights_only_loads(self.engine)
        if saved_dp != self.dp_size:
            tag, loads = UNIVERSAL_TAG, universal_loads(self.engine)
            self._convert_to_universal(Path(directory), saved_dp)
        with loads:
            path, _ = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint with tag {tag!r}")
        for group in self.optimizer.param_groups:  # the saved groups replace ours; older ones lack wd_mult
            group.setdefault("wd_mult", 1.0 if group["weight_decay"] else 0.0)
        install_step_gating(self.engine, self.model)

    def _convert_to_universal(self, directory: Path, saved_dp: int) -> None:
        """Rank 0 converts (unless done before: the conversion is kept, published whole), the others wait."""
        out = directory / UNIVERSAL_TAG
        if dist.get_rank() == 0 and not out.is_dir():
            print(f"converting {directory / CHECKPOINT_TAG} (data-parallel size {saved_dp}) "
                  f"to DeepSpeed's universal checkpoint {out} to resume at data-parallel size {self.dp_size}",
                  file=sys.stderr, flush=True)
            with building(out) as work:
                to_universal(directory / CHECKPOINT_TAG, work)
        dist.barrier()

    def shutdown(self) -> None:
        self.engine.destroy()
        super().shutdown()
