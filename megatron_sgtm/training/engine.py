"""The engine contract: all the trainer (loop, calibration, checkpoints) uses of an engine.

Every framework builds the model the same way, routes gradients by the token labels, gates each step by
the global batch's label counts and schedules the LR with megatron's `OptimizerParamScheduler`; a
subclass adds only its model wrapping, gated optimizer, micro-batch execution and checkpoint format.
"""

from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_sgtm.core.gating import Gate, step_counts
from megatron_sgtm.core.labels import label_flags, token_labels
from megatron_sgtm.core.partition import Partition
from megatron_sgtm.core.regions import ablated
from megatron_sgtm.model import build_gpt_model
from megatron_sgtm.training.batch_geometry import PACKED_PARAMS, model_inputs, packed_document_params
from megatron_sgtm.training.checkpoint import init_weights
from megatron_sgtm.training.config import TrainConfig

if TYPE_CHECKING:
    from megatron_sgtm.training.calibration import OutputBias


def step_metrics(loss_sum: float, tokens: float, grad_norm, lr: float, counts: torch.Tensor, gate: Gate) -> dict:
    """What every engine's `train_step` reports to the loop."""
    return {
        "loss": float(loss_sum) / max(tokens, 1.0),
        "tokens": tokens,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "label_counts": counts.tolist(),
        "gated_retain": gate.retain,
        "gated_forget": gate.forget,
    }


def lr_scheduler(optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    """Linear warmup from `optim.warmup_init_lr`, cosine decay to `optim.min_lr` over the run; constant weight
    decay (each param group's ``wd_mult`` scales it). Sets the groups' lr and weight decay for step 0."""
    o, total = cfg.optim, cfg.train.train_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=o.warmup_init_lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(total, o.warmup_steps + 1), lr_decay_style="cosine",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=total, wd_incr_style="constant",
    )


def transformer_options(cfg: TrainConfig) -> dict:
    """The TransformerConfig keys the train config sets, whatever the engine."""
    return {"recompute_granularity": cfg.train.recompute_granularity}


class Engine(abc.ABC):
    """One job's model, optimizer and schedule (every call is collective). The trainer also reads `cfg`,
    `partition`, `model` (this rank's unwrapped GPTModel), `dp_rank`/`dp_size`/`dp_group`, and sets
    `output_bias` while calibrating. Batches are lists of this DP rank's micro-batches."""

    name: ClassVar[str]
    # Set by the subclass: the model as its framework wraps it, and the optimizer whose param_groups
    # the scheduler (`start_schedule`) drives.
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: OptimizerParamScheduler

    def __init__(self, cfg: TrainConfig, partition: Partition | None, on_gpu: bool, *, bf16: bool,
                 weights: dict[str, torch.Tensor] | None = None, **config_options):
        """Parallel state and the initialised model (global `weights` loaded when given, see `init_weights`);
        `config_options` go to the TransformerConfig."""
        par = cfg.parallel
        layout = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=layout[0], pipeline_model_parallel_size=layout[1])
        elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != layout:
            raise RuntimeError(f"megatron's parallel state is already set up for another layout than TP {layout[0]} "
                               f"x PP {layout[1]}; shut the other engine down first")
        # else: another engine of this process shares the same layout (tools/bench_train.py interleaves two)
        model_parallel_cuda_manual_seed(cfg.train.seed)
        self.cfg, self.partition = cfg, partition
        self.config = cfg.model.transformer_config(
            on_gpu=on_gpu, bf16=bf16, tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size, **transformer_options(cfg),
            **config_options,
        )
        self.model = build_gpt_model(cfg.model, self.config, partition, backend="gpu" if on_gpu else "local")
        init_weights(self.model, cfg, weights)
        if on_gpu:
            self.model.cuda()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.output_bias: OutputBias | None = None

    def start_schedule(self) -> None:
        self.scheduler = lr_scheduler(self.optimizer, self.cfg)

    # -- what every framework shares ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """This rank's device: where micro-batches, activations and the step's loss sums live."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _to_device(self, batches: list[dict]) -> list[dict]:
        """The micro-batches on this rank's device, with their `label_flags` (and, packed, their THD
        `PACKED_PARAMS`) read on the host first: the forward then reads nothing back from the device."""
        device = self.device
        out = []
        for mb in batches:
            moved = {k: v.to(device) for k, v in mb.items()}
            if "token_labels" in mb:
                moved["label_flags"] = label_flags(mb["token_labels"])
            if self.packs_sequences:
                moved[PACKED_PARAMS] = packed_document_params(mb["position_ids"], device)
            out.append(moved)
        return out

    @property
    def packs_sequences(self) -> bool:
        """Document attention through `PackedSeqParams` (``data.attention: packed``): each micro-batch's b
        rows run as one THD row of b*s tokens, so activations are [b*s, 1, h] between pipeline stages."""
        return self.cfg.data.document_attention and self.cfg.data.attention == "packed"

    def _forward(self, module: torch.nn.Module, mb: dict, use_labels: bool) -> torch.Tensor:
        """Per-token losses [b, s] of one micro-batch (on the last pipeline stage); with `use_labels` the SGTM
        layers route its gradients by the token labels (training), without them it is the plain model
        (evaluation)."""
        inputs, attention = model_inputs(mb, self.cfg.data.document_attention, self.packs_sequences)
        if self.output_bias is not None:
            self.output_bias.observe(inputs)
        with token_labels(inputs["token_labels"] if use_labels else None, mb.get("label_flags")):
            out = module(inputs["tokens"], inputs["position_ids"], labels=inputs["targets"], **attention)
        return out.reshape(mb["tokens"].shape) if ps.is_pipeline_last_stage() else out

    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step on the global batch; the metrics of `step_metrics`."""
        counts = step_counts(batches, self.dp_group)  # on the host batches, before `_to_device`
        gate = counts.gate(self.cfg.strategy)
        loss_sum, tokens, grad_norm = self._optimizer_step(self._to_device(batches), gate, counts.loss_weight)
        self.scheduler.step(increment=1)
        return step_metrics(loss_sum, tokens, grad_norm, self.optimizer.param_groups[0]["lr"], counts.counts, gate)

    @torch.no_grad()
    def evaluate(self, batches: list[dict], ablate: bool = False) -> tuple[float, float]:
        """(loss sum, tokens) of a forward pass without labels over the global batch, live or ablated."""
        self.wrapped.eval()
        with self._ablated() if ablate else contextlib.nullcontext():
            result = self._forward_only(self._to_device(batches))
        self.wrapped.train()
        return result

    @torch.no_grad()
    def token_losses(self, batches: list[dict], ablate: bool = False) -> list[torch.Tensor]:
        """Like `evaluate`, but the loss of every loss-bearing token: one CPU tensor per micro-batch of the
        global batch (micro-batch i of DP rank r is number i·DP + r), on every rank."""
        found: list[torch.Tensor] = []
        self.wrapped.eval()
        with self._ablated() if ablate else contextlib.nullcontext():
            self._forward_only(self._to_device(batches), found)
        self.wrapped.train()
        mine = found if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 else None
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (self.dp_rank, mine))
        per_rank = {rank: losses for rank, losses in shares if losses is not None}
        return [per_rank[r][i] for i in range(len(batches)) for r in range(self.dp_size)]

    def _ablated(self) -> contextlib.AbstractContextManager:
        """Θ_F := 0 for the duration."""
        return ablated(self.model)

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        """Continue the schedule at the saved step (megatron's `load_state_dict` counts from where the
        scheduler stands, so from a fresh one)."""
        self.start_schedule()
        self.scheduler.load_state_dict(state)

    def shutdown(self) -> None:
        ps.destroy_model_parallel()

    # -- what each framework does its own way ------------------------------------------------
    @abc.abstractmethod
    def _optimizer_step(self, batches: list[dict], gate: Gate, loss_weight: float
                        ) -> tuple[float | torch.Tensor, float, float | None]:
        """Forward/backward of every micro-batch and the optimizer step gated by `gate` (`set_step_gate` on the
        optimizers of `install_step_gating`); (loss sum, tokens, grad norm) over the global batch. `loss_weight`
        is the global batch's loss-mask sum. The loss sum is summed on the device and may be returned there:
        `step_metrics` reads it once per step, never once per micro-batch (a host sync each)."""

    @abc.abstractmethod
    def _forward_only(self, batches: list[dict], token_losses: list | None = None) -> tuple[float, float]:
        """(loss sum, tokens) of a forward pass without labels over the global batch; with `token_losses`, the
        last stage also appends each micro-batch's losses at its loss-bearing positions (CPU, fp32) there."""

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """Model and optimizer state into `directory` (collective)."""

    @abc.abstractmethod
    def load(self, directory: str, meta: dict | None = None) -> None:
        """Model and optimizer state from `directory` (collective), step gating re-installed. `meta` is the
        checkpoint's checked meta.json (`checkpoint.load`), for an engine that loads other layouts its own way."""
