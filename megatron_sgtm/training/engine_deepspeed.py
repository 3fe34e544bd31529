"""Engine ``deepspeed``: the SGTM GPTModel (megatron-core TP layers, PP=1) under DeepSpeed ZeRO 1/2/3.

The model is built exactly as for the megatron engine (megatron's parallel state provides the TP
groups; DeepSpeed gets them through `mpu`, so its data-parallel group is megatron's). The client
optimizer is `SGTMAdamW`; DeepSpeed flattens, partitions and steps it. Step gating needs the region
code of every element of the flat fp32 partition each rank owns, so after `deepspeed.initialize`
the per-parameter codes (`gating.region_codes`) are laid out the way DeepSpeed lays out its flat
buffers:

- ZeRO-1/2 (`stage_1_and_2.py`): per param group, the parameters in `round_robin_bit16_groups[i]`
  order at `round_robin_bit16_offsets[i]` in a flat buffer of `bit16_groups_flat[i].numel()`
  elements (alignment padding at the end and between parameters is Θ_J); rank r owns the r-th of
  `dp` equal slices (`get_data_parallel_partitions`), which is `single_partition_of_fp32_groups[i]`.
- ZeRO-3 (`stage3.py`): per sub-group `fp16_groups[j]`, the concatenation of each parameter's
  `ds_tensor` partition: elements [r*ps, (r+1)*ps) of the flattened parameter padded to a multiple
  of `dp` (the padding is Θ_J); `fp32_partitioned_groups_flat[j]` holds it.

Micro-batch losses are per-token sums divided by the global batch's loss-token count (times the
DP size, since DeepSpeed averages gradients over DP), so updates equal the megatron engine's.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_sgtm.compat.deepspeed import relink_optimizer_states, skip_cpu_shm_comm_build, weights_only_loads
from megatron_sgtm.core.gating import Gate, SGTMAdamW, region_codes
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.regions import ablate, param_regions, sgtm_linears
from megatron_sgtm.core.strategy import Region
from megatron_sgtm.training.config import TrainConfig
from megatron_sgtm.training.engine import Engine

CHECKPOINT_TAG = "deepspeed"


class ZeroSGTMAdamW(SGTMAdamW):
    """SGTMAdamW as DeepSpeed calls it: several `step()` calls per optimizer step.

    ZeRO-1/2 step each param group separately; ZeRO-3 steps each sub-group with the other groups'
    `params` emptied. The per-region step counters of a group must advance once per *engine* step,
    so `begin_step()` (called by the engine before `engine.step()`) opens a step, and a call that
    finds a group empty or already advanced in this step leaves its counters where they were.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._advanced: set[int] = set()

    def begin_step(self) -> None:
        self._advanced = set()

    @torch.no_grad()
    def step(self, closure=None):
        gate = self.gate
        increment = [1, 0 if gate.retain else 1, 0 if gate.forget else 1]
        for group in self.param_groups:
            steps = group.setdefault("sgtm_steps", [0, 0, 0])
            key = id(group)
            if not group["params"] or key in self._advanced:
                # SGTMAdamW.step adds `increment`; pre-subtract it so this call does not advance.
                for code in (Region.JOINT, Region.RETAIN, Region.FORGET):
                    steps[code] -= increment[code]
            else:
                self._advanced.add(key)
        return super().step(closure)


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


def check_resume_layout(path: Path, meta: dict, dp_size: int, tp_size: int) -> None:
    """DeepSpeed 0.19 loads ZeRO optimizer state only at the DP size it was saved at (another one needs
    an offline conversion to its universal format), and model states per TP rank: refuse any other
    layout by the checkpoint's meta.json, before DeepSpeed is started."""
    from megatron_sgtm.training.checkpoint import CheckpointError

    par = meta["config"]["parallel"]
    saved_tp = par["tensor_model_parallel_size"]
    saved_dp = meta["world_size"] // (saved_tp * par["pipeline_model_parallel_size"])
    if meta.get("engine") != "deepspeed":
        raise CheckpointError(f"{path}: a {meta.get('engine')} engine checkpoint; engine=deepspeed resumes only "
                              "its own checkpoints")
    if (saved_dp, saved_tp) != (dp_size, tp_size):
        raise CheckpointError(f"{path}: saved by engine=deepspeed at data-parallel size {saved_dp} (TP {saved_tp}); "
                              f"it resumes only at that layout, not at data-parallel size {dp_size} (TP {tp_size}) "
                              "(engine=megatron checkpoints resume at any layout)")


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, partition: Partition | None, on_gpu: bool):
        if not on_gpu:
            skip_cpu_shm_comm_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        super().__init__(cfg, partition, on_gpu, bf16=cfg.train.bf16)

        # Region codes per parameter, computed while parameters still have their full local shape.
        regions = param_regions(self.model)
        self.named = dict(self.model.named_parameters())
        self.model_shape = {name: tuple(p.shape) for name, p in self.named.items()}  # ZeRO-3 empties .shape
        self.codes: dict[int, torch.Tensor] = {}
        for name, param in self.named.items():
            codes = region_codes(regions[name], param.detach().cpu())
            if codes is not None:
                self.codes[id(param)] = codes.reshape(-1)

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
        self.zero = self.engine.optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        expected = DeepSpeedZeroOptimizer_Stage3 if self.zero_stage == 3 else DeepSpeedZeroOptimizer
        if not isinstance(self.zero, expected):
            # e.g. DeepSpeed's BF16_Optimizer: another flat layout, which the region codes do not map
            raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(self.zero).__name__}, expected "
                               f"{expected.__name__} for ZeRO stage {self.zero_stage}")
        self.micro_batches = self.ds_config["gradient_accumulation_steps"]
        self.start_schedule()
        self.install_region_codes()

    # -- step gating: region codes of the flat fp32 partitions -------------------------------
    def _param_codes(self, param: torch.Tensor, numel: int) -> torch.Tensor:
        codes = self.codes.get(id(param))
        return torch.full((numel,), Region.JOINT, dtype=torch.uint8) if codes is None else codes

    def layout_partitions(self, values, dtype: torch.dtype, fill=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Lay per-parameter flat tensors out as this rank's flat fp32 partitions.

        `values(param, numel)` gives the flattened (model-space, full local shape) tensor of a model
        parameter; returns (fp32 partition the optimizer steps, the laid-out tensor) per partition,
        with `fill` at DeepSpeed's padding. The region codes and the tests' check of this mapping
        against DeepSpeed's own gather helpers both go through here.
        """
        zero = self.zero
        out = []
        if self.zero_stage in (1, 2):
            for i, flat in enumerate(zero.bit16_groups_flat):
                full = torch.full((flat.numel(),), fill, dtype=dtype)
                for param, meta, offset in zip(zero.round_robin_bit16_groups[i], zero.round_robin_bit16_meta[i],
                                               zero.round_robin_bit16_offsets[i]):
                    full[offset:offset + meta.numel()] = values(param, meta.numel()).reshape(-1).to(dtype)
                group = zero.real_dp_process_group[i]
                world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
                sizes = [flat.numel() // world + (1 if r < flat.numel() % world else 0) for r in range(world)]
                start = sum(sizes[:rank])
                out.append((zero.single_partition_of_fp32_groups[i], full[start:start + sizes[rank]].clone()))
        else:
            for j, sub_group in enumerate(zero.fp16_groups):
                pieces = []
                for param in sub_group:
                    part = param.partition_numel()
                    rank = dist.get_rank(group=param.ds_process_group)
                    padded = torch.full((param.ds_numel_aligned,), fill, dtype=dtype)
                    padded[:param.ds_numel] = values(param, param.ds_numel).reshape(-1).to(dtype)
                    pieces.append(padded[rank * part:(rank + 1) * part])
                out.append((zero.fp32_partitioned_groups_flat[j], torch.cat(pieces)))
        for fp32, laid in out:
            if laid.numel() != fp32.numel():
                raise RuntimeError(f"laid out {laid.numel()} elements for an fp32 partition of {fp32.numel()}")
        return out

    def partition_codes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(flat fp32 partition this rank's optimizer steps, its uint8 region codes); padding is Θ_J."""
        return self.layout_partitions(self._param_codes, torch.uint8, fill=Region.JOINT)

    def install_region_codes(self) -> None:
        for fp32, codes in self.partition_codes():
            gated = codes.to(fp32.device) if bool((codes != Region.JOINT).any()) else None
            self.optimizer.set_region_codes(fp32, gated)
            state = self.optimizer.state[fp32]
            if not state:  # eager Adam state, for ZeRO-1/2 to link (below) before any step
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(fp32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(fp32, memory_format=torch.preserve_format)
        if self.zero_stage in (1, 2):
            relink_optimizer_states(self.zero)

    # -- one optimizer step: DeepSpeed's forward/backward/step per micro-batch ---------------
    def _optimizer_step(self, batches: list[dict], gate: Gate, loss_weight: float) -> tuple[torch.Tensor, float, float]:
        if len(batches) != self.micro_batches:
            raise ValueError(f"train_step got {len(batches)} micro-batches; DeepSpeed was configured for "
                             f"{self.micro_batches} (global_batch_size / (micro_batch_size x DP))")
        self.optimizer.gate = gate
        self.optimizer.begin_step()
        # DeepSpeed averages gradients over DP; the per-token normalisation wants their sum.
        scale = self.dp_size / max(loss_weight, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for mb in batches:
            per_token = self._forward(self.engine, mb, use_labels=True)
            weighted = (per_token.float() * mb["loss_mask"]).sum()
            loss_sum += weighted.detach().double().cpu()
            self.engine.backward(weighted * scale, scale_wrt_gas=False)
            self.engine.step()
        dist.all_reduce(loss_sum, group=self.dp_group)
        return loss_sum, loss_weight, self.engine.get_global_grad_norm()

    def _forward_only(self, batches: list[dict], token_losses: list | None = None) -> tuple[float, float]:
        total = torch.zeros(2, dtype=torch.float64)
        for mb in batches:
            per_token = self._forward(self.engine, mb, use_labels=False)
            if token_losses is not None:
                token_losses.append(per_token.detach().float()[mb["loss_mask"] > 0].cpu())
            total[0] += (per_token.float() * mb["loss_mask"]).sum().double().cpu()
            total[1] += mb["loss_mask"].double().sum().cpu()
        dist.all_reduce(total, group=self.dp_group)
        return float(total[0]), float(total[1])

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

    def load(self, directory: str) -> None:
        with weights_only_loads(self.engine):
            path, _ = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r}")
        for group in self.optimizer.param_groups:  # the saved groups replace ours; older ones lack wd_mult
            group.setdefault("wd_mult", 1.0 if group["weight_decay"] else 0.0)
        self.install_region_codes()

    def shutdown(self) -> None:
        self.engine.destroy()
        super().shutdown()
