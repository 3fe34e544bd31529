"""Training configuration: one YAML file plus ``--section.key=value`` overrides, validated up front.

Everything a run needs is checked here, before any process group exists: unknown keys, a layout
that does not divide the world size, DeepSpeed stage 3 with PP > 1, a missing data path, a
partition that does not fit the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_sgtm.data.labeling import LabelingConfig
from megatron_sgtm.model import ModelConfig
from megatron_sgtm.partition import PartitionError, SGTMConfig
from megatron_sgtm.strategy import METHODS, SGTM


class ConfigError(ValueError):
    """A configuration problem; the message names the file, section and key."""


# A nested settings object whose keys a section writes flat, beside its own (`data.tau_forget`, not
# `data.labeling.tau_forget`): existing configs, overrides and sweep grids keep their keys.
_FLAT = "flat"
# Run-wide settings a flat-nested object holds but a user sets elsewhere (the labeling seed is train.seed).
_NOT_FLAT_KEYS = {"seed"}


@dataclass
class DataConfig:
    path: str = ""  # a shard directory written by `megatron-sgtm data build` / `data tag`
    mode: str = "packed"  # packed | batch_uniform
    document_attention: bool = True  # attention stays inside each packed document
    heldout_fraction: float = 0.05
    # tau_forget, tau_retain, retain_rate, undiscovered_rate, false_positive_rate, forget_categories and
    # score_source: written flat in `data:`; their seed is train.seed.
    labeling: LabelingConfig = field(default_factory=LabelingConfig, metadata={_FLAT: LabelingConfig})
    adjacent_categories: list[str] = field(default_factory=lambda: ["italian"])
    retain_categories: list[str] = field(default_factory=lambda: ["english"])
    skip_bad_shards: bool = False


@dataclass
class ParallelConfig:
    engine: str = "megatron"  # megatron | deepspeed
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1  # deepspeed engine
    deepspeed_config: str | None = None  # a DeepSpeed JSON; its zero/optimizer sections win
    cpu_offload: bool = False
    # megatron engine (its DDP config): overlap the gradient reduce-scatter with backward, the parameter
    # all-gather with the next forward. DeepSpeed's equivalents (overlap_comm, contiguous_gradients, bucket
    # sizes) go in deepspeed_config's zero_optimization section.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs overlap_grad_reduce


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    global_batch_size: int = 8
    micro_batch_size: int = 2


@dataclass
class TrainLoopConfig:
    train_steps: int = 100
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 8  # micro-batches per category over all DP ranks; 0 = the whole held-out stream
    calibrate_ablated: bool = False  # also report ablated losses after fitting an output bias on retain data
    calibration_iters: int = 8  # forward passes over eval_batches retain training batches
    bf16: bool = False
    # megatron's activation recomputation: None or "selective" (core attention, which reads no labels);
    # "full" is refused: a recomputed layer would run outside its micro-batch's token labels
    recompute_granularity: str | None = None


@dataclass
class CheckpointConfig:
    dir: str | None = None
    save_interval: int = 0
    keep_last: int = 2
    resume: str | None = None  # None | "auto" | a checkpoint directory
    pretrained: str | None = None  # initial weights from a model-only checkpoint (ablate / import-hf output)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "megatron-sgtm"


@dataclass
class TrainConfig:
    model: ModelConfig
    method: str = SGTM.name
    sgtm: SGTMConfig = field(default_factory=SGTMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.data.labeling = dataclasses.replace(self.data.labeling, seed=self.train.seed)

    @property
    def strategy(self) -> str:
        return METHODS[self.method].strategy.name

    @property
    def data_filter(self) -> str:
        return METHODS[self.method].data_filter

    def to_dict(self) -> dict:
        """The config in its YAML form: `from_dict(cfg.to_dict())` gives `cfg` back."""
        out = dataclasses.asdict(self)
        for name, cls in SECTIONS.items():
            for f in _flat_fields(cls):
                nested = out[name].pop(f.name)
                out[name].update({k: v for k, v in nested.items() if k not in _NOT_FLAT_KEYS})
        return out


SECTIONS = {
    "model": ModelConfig,
    "sgtm": SGTMConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "train": TrainLoopConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (or ``--section.key=value``) overrides; values parse as YAML."""
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def _flat_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if _FLAT in f.metadata]


def _flat_keys(nested_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(nested_cls)} - _NOT_FLAT_KEYS


def _section(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    flat = _flat_fields(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {f.name for f in flat}
    names |= {key for f in flat for key in _flat_keys(f.metadata[_FLAT])}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = dict(values)
    try:
        for f in flat:
            nested_cls = f.metadata[_FLAT]
            values[f.name] = nested_cls(**{k: values.pop(k) for k in _flat_keys(nested_cls) if k in values})
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def from_dict(raw: dict, source: str = "<config>") -> TrainConfig:
    raw = dict(raw)
    unknown = sorted(set(raw) - set(SECTIONS) - {"method"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(SECTIONS) + ['method']}")
    if "model" not in raw:
        raise ConfigError(f"{source}: section 'model' is required")
    method = raw.pop("method", SGTM.name)
    if method not in METHODS:
        raise ConfigError(f"{source}: method={method!r}: expected one of {sorted(METHODS)}")
    sections = {name: _section(cls, raw.get(name), f"{source}: {name}") for name, cls in SECTIONS.items()}
    strategy = METHODS[method].strategy.name
    asked = sections["sgtm"].strategy if "strategy" in (raw.get("sgtm") or {}) else strategy
    if asked != strategy:
        methods = [name for name, m in METHODS.items() if m.strategy.name == asked]
        fix = f" or set method={'|'.join(methods)}" if methods else ""
        raise ConfigError(f"{source}: sgtm.strategy={asked!r} conflicts with method={method!r} (method decides the "
                          f"strategy; remove sgtm.strategy{fix})")
    cfg = TrainConfig(method=method, **sections)
    cfg.sgtm.strategy = strategy
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    source = "<overrides>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        source = str(path)
    return from_dict(apply_overrides(raw, list(overrides)), source)


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Checks that need the world size; run on every rank before any distributed work."""
    par, optim = cfg.parallel, cfg.optim
    if par.engine not in ("megatron", "deepspeed"):
        raise ConfigError(f"parallel.engine={par.engine!r}: expected 'megatron' or 'deepspeed'")
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if model_parallel < 1 or world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size x pipeline_model_parallel_size = {model_parallel} does not "
            f"divide the world size {world_size}"
        )
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    if par.engine == "deepspeed":
        if par.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={par.zero_stage}: expected 1, 2 or 3")
        if par.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel is not supported with engine=deepspeed (its layer-norm gradients "
                "need megatron's TP all-reduce); use engine=megatron"
            )
        if par.pipeline_model_parallel_size > 1:
            raise ConfigError(
                f"parallel.engine=deepspeed runs pipeline_model_parallel_size=1 only (got "
                f"{par.pipeline_model_parallel_size}); ZeRO stage {par.zero_stage} shards the optimizer "
                "instead (use engine=megatron for pipeline parallelism)"
            )
    if cfg.train.recompute_granularity not in (None, "selective"):
        raise ConfigError(
            f"train.recompute_granularity={cfg.train.recompute_granularity!r}: expected null or 'selective' "
            "('full' recomputes whole layers in backward, outside their micro-batch's SGTM labels)"
        )
    if par.overlap_param_gather and not par.overlap_grad_reduce:
        raise ConfigError("parallel.overlap_param_gather needs parallel.overlap_grad_reduce")
    if par.engine == "deepspeed" and (par.overlap_grad_reduce or par.overlap_param_gather):
        raise ConfigError("parallel.overlap_grad_reduce / overlap_param_gather are megatron engine options; with "
                          "engine=deepspeed set overlap_comm in parallel.deepspeed_config's zero_optimization")
    dp = world_size // model_parallel
    if optim.global_batch_size % (optim.micro_batch_size * dp):
        raise ConfigError(
            f"optim.global_batch_size={optim.global_batch_size} must be a multiple of micro_batch_size="
            f"{optim.micro_batch_size} x data-parallel size {dp}"
        )
    if cfg.train.eval_batches % dp:
        raise ConfigError(
            f"train.eval_batches={cfg.train.eval_batches} (micro-batches per category, over all data-parallel "
            f"ranks) must be a multiple of the data-parallel size {dp}"
        )
    if cfg.train.calibrate_ablated and cfg.train.calibration_iters < 1:
        raise ConfigError(f"train.calibration_iters={cfg.train.calibration_iters}: must be >= 1 with "
                          "train.calibrate_ablated")
    if cfg.checkpoint.pretrained:
        _check_pretrained(cfg)
    if not cfg.data.path:
        raise ConfigError("data.path is required (a shard directory from `megatron-sgtm data build`)")
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        raise ConfigError(f"data.path={cfg.data.path}: no manifest.json there (not a shard directory)")
    try:
        partition = cfg.sgtm.resolve(cfg.model.dims())
        partition.check_tp(par.tensor_model_parallel_size)
    except PartitionError as err:
        raise ConfigError(f"sgtm: {err}") from err
    if cfg.model.num_layers % par.pipeline_model_parallel_size:
        raise ConfigError(
            f"model.num_layers={cfg.model.num_layers} is not divisible by pipeline_model_parallel_size="
            f"{par.pipeline_model_parallel_size}"
        )


def _check_pretrained(cfg: TrainConfig) -> None:
    """checkpoint.pretrained must be a model-only checkpoint of this very model shape."""
    from megatron_sgtm.training.checkpoint import CheckpointError, model_only_meta

    try:
        meta = model_only_meta(Path(cfg.checkpoint.pretrained))
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.pretrained: {err}") from err
    theirs = ModelConfig(**meta["config"]["model"])
    if theirs.dims() != cfg.model.dims() or theirs.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"checkpoint.pretrained={cfg.checkpoint.pretrained}: its model ({meta['config']['model']}) "
                          "does not have this config's model shape")
