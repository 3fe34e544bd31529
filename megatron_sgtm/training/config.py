"""Training configuration: one YAML file plus ``--section.key=value`` overrides, validated up front.

Everything a run needs is checked here, before any process group exists: broken YAML, unknown keys,
values of the wrong type or out of range, a layout that does not divide the world size, DeepSpeed
stage 3 with PP > 1, a missing data path, categories the data does not hold, a partition that does
not fit the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_sgtm.core.model_hooks import TIED_MASK_EMBEDDINGS
from megatron_sgtm.core.partition import PartitionError, SGTMConfig
from megatron_sgtm.core.strategy import METHODS, SGTM
from megatron_sgtm.data.labeling import LabelingConfig
from megatron_sgtm.data.sampler import MODES
from megatron_sgtm.data.shards import Manifest, ShardError
from megatron_sgtm.errors import UserError, load_yaml, yaml_problem
from megatron_sgtm.model import ModelConfig


class ConfigError(UserError, ValueError):
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
    # The share of the ground-truth forget-category training documents kept (seeded by train.seed; the held-out
    # split is unchanged): the leakage grid's runs vary the forget tokens a model sees.
    forget_keep_fraction: float = 1.0
    # tau_forget, tau_retain, retain_rate, undiscovered_rate, false_positive_rate, forget_categories and
    # score_source: written flat in `data:`; their seed is train.seed.
    labeling: LabelingConfig = field(default_factory=LabelingConfig, metadata={_FLAT: LabelingConfig})
    adjacent_categories: list[str] = field(default_factory=lambda: ["italian"])
    retain_categories: list[str] = field(default_factory=lambda: ["english"])
    skip_bad_shards: bool = False
    # With document_attention: packed = megatron's PackedSeqParams (THD varlen attention, no [s, s] mask);
    # dense = a [b, 1, s, s] boolean mask (the reference the packed path is tested against; TE refuses it).
    attention: str = "packed"
    # Token shares of named pools in every global step, e.g. {forget: 0.5, retain: 0.5} (the fine-tuning
    # attack): a key is a category group (forget = forget_categories, retain, adjacent) or a category name;
    # the pools are drawn from the training (non-held-out) documents by ground-truth category. None: mode's pools.
    mixture: dict[str, float] | None = None
    # Instead of `path`: a Megatron indexed dataset (PREFIX.bin/.idx) tagged by `megatron-sgtm data tag-indexed`,
    # read through LabelledGPTDataset (megatron's GPTDataset order, its `labels` as targets).
    indexed_prefix: str | None = None
    indexed_labels: str | None = None  # its label sidecar (default PREFIX.sgtm_labels)
    indexed_split: str = "98,2,0"  # megatron's train,valid,test split of the index; valid documents are held out
    eod_id: int | None = None  # the index's end-of-document token id (indexed data needs it)


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
    warmup_init_lr: float = 0.0  # the LR warmup starts from (megatron's OptimizerParamScheduler init_lr)
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
    # also report ablated losses after the paper's logit calibration (training/calibration.py): an output bias
    # fitted with AdamW on eval_batches training micro-batches of forget, adjacent and retain data
    calibrate_ablated: bool = False
    calibration_steps: int = 200  # AdamW steps, each on one cached micro-batch per group
    calibration_alpha: float = 100.0  # weight of the retain loss (loss = L_f + beta L_adj + alpha L_ret)
    calibration_beta: float = 100.0  # weight of the adjacent loss
    calibration_lr: float = 1e-2  # decays linearly to a tenth over the steps
    bf16: bool = False
    max_bad_steps: int = 1  # consecutive steps with a non-finite loss or grad norm that end the run (an error)
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
    verify: bool = True  # check a loaded checkpoint's files against the SHA-256 its meta.json recorded


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    wandb_mode: str = "offline"  # offline | online (API key from WANDB_API_KEY or `wandb login`) | disabled
    wandb_project: str = "megatron-sgtm"
    wandb_entity: str | None = None  # team or user; None: the API key's default entity
    wandb_group: str | None = None  # sweeps set the grid name
    wandb_name: str | None = None  # sweeps set the run name; None: wandb's generated name


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
        del out["sgtm"]["strategy"]  # set from `method`, never given
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


def _parse_value(item: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(err)})") from err


def override_flags(overrides: list[str]) -> dict[str, str]:
    """The flag that set each dotted key (``optim.lr`` -> ``--optim.lr=abc``): an error about that key names
    the flag, not the YAML file, which does not hold the value."""
    return {item.removeprefix("--").split("=", 1)[0]: item for item in overrides if "=" in item}


def _origin(source: str, flags: dict[str, str], key: str) -> str:
    """What an error about `key` (dotted) blames: the override flag that set it, else the config file."""
    return f"override {flags[key]!r}" if key in flags else source


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
        node[parts[-1]] = _parse_value(item, value)
    return raw


# Value types. YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string, so numeric strings count as numbers.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
               str: ("a string", "strings")}


class _Mismatch(Exception):
    """A value that does not fit its field's type."""


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _convert(value: Any, tp: Any) -> Any:
    """`value` as field type `tp` (a scalar, a list or tuple of scalars, or a union with None); else _Mismatch."""
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for member in (m for m in typing.get_args(tp) if m is not type(None)):
            try:
                return _convert(value, member)
            except _Mismatch:
                pass
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise _Mismatch
        key_type, value_type = typing.get_args(tp)
        return {_convert(k, key_type): _convert(v, value_type) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = [_convert(item, typing.get_args(tp)[0]) for item in value]
        return tuple(items) if origin is tuple else items
    if (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    number = _number(value) if tp in (int, float) else None
    if tp is float and number is not None:
        return float(number)
    if tp is int and number is not None and float(number).is_integer():
        return int(number)
    if tp not in _TYPE_NAMES:
        raise TypeError(f"config field type {tp!r} is not supported")
    raise _Mismatch


def _describe(tp: Any) -> str:
    """What a value of type `tp` is, in words: 'an integer, a list of integers or null'."""
    if _is_union(tp):
        words = [_describe(member) for member in typing.get_args(tp) if member is not type(None)]
        words += ["null"] if type(None) in typing.get_args(tp) else []
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_TYPE_NAMES[typing.get_args(tp)[0]][1]}"
    if typing.get_origin(tp) is dict:
        key_type, value_type = typing.get_args(tp)
        return f"a mapping of {_TYPE_NAMES[key_type][1]} to {_TYPE_NAMES[value_type][1]}"
    return _TYPE_NAMES[tp][0]


# Range rules of single keys, checked on the values a config gives (the defaults obey them).
_Rule = tuple[Callable[[Any], bool], str]
_POSITIVE: _Rule = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE: _Rule = (lambda v: v >= 0, "must be >= 0")
_AT_LEAST_ONE: _Rule = (lambda v: v >= 1, "must be >= 1")
_BETA: _Rule = (lambda v: 0 <= v < 1, "must lie in [0, 1)")


def _one_of(choices) -> _Rule:
    return (lambda v: v in choices, f"expected one of {list(choices)}")


_RULES: dict[str, dict[str, _Rule]] = {
    "model": {**{key: _AT_LEAST_ONE for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                                "seq_length", "num_query_groups", "ffn_hidden_size")},
              "init_method_std": _POSITIVE, "rotary_base": _POSITIVE},
    "data": {"heldout_fraction": (lambda v: 0 < v < 1, "must lie in (0, 1)"), "mode": _one_of(MODES),
             "forget_keep_fraction": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
             "attention": _one_of(("packed", "dense")),
             "mixture": (lambda v: all(share > 0 for share in v.values()), "every share must be > 0")},
    "parallel": {"tensor_model_parallel_size": _AT_LEAST_ONE, "pipeline_model_parallel_size": _AT_LEAST_ONE},
    "optim": {"lr": _POSITIVE, "min_lr": _NON_NEGATIVE, "warmup_init_lr": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE,
              "weight_decay": _NON_NEGATIVE,
              "beta1": _BETA, "beta2": _BETA, "eps": _POSITIVE, "clip_grad": _NON_NEGATIVE,
              "global_batch_size": _AT_LEAST_ONE, "micro_batch_size": _AT_LEAST_ONE},
    # log_interval divides the step number: unlike the eval and save intervals, 0 cannot mean "never"
    # train_steps 0: evaluate only (e.g. a model-only checkpoint given as checkpoint.pretrained)
    "train": {"train_steps": _NON_NEGATIVE, "log_interval": _AT_LEAST_ONE, "eval_interval": _NON_NEGATIVE,
              "eval_batches": _NON_NEGATIVE, "calibration_steps": _NON_NEGATIVE, "calibration_alpha": _NON_NEGATIVE,
              "calibration_beta": _NON_NEGATIVE, "calibration_lr": _POSITIVE, "max_bad_steps": _AT_LEAST_ONE},
    "checkpoint": {"save_interval": _NON_NEGATIVE, "keep_last": _AT_LEAST_ONE},
    "logging": {"wandb_mode": _one_of(("offline", "online", "disabled"))},
}


# Keys a release removed, by section: the key that replaces each (named in the error).
_REPLACED = {"train": {"calibration_iters": "calibration_steps (the paper's AdamW fit; also calibration_alpha, "
                                            "calibration_beta, calibration_lr)"}}


def recorded_config(meta: dict) -> dict:
    """A copy of the config a checkpoint's meta.json recorded, without the keys a later release removed (they
    configured how a run was evaluated, not the model), so that `eval`, `attack` and `unlearn` read old checkpoints."""
    config = copy.deepcopy(meta.get("config") or {})
    for section, keys in _REPLACED.items():
        for key in keys:
            config.get(section, {}).pop(key, None)
    config.get("sgtm", {}).pop("strategy", None)  # recorded before `method` became the one key
    return config


def recorded_sgtm(config: dict) -> SGTMConfig | None:
    """The `sgtm` section of a recorded config (`recorded_config`) with the strategy its `method` gives (None
    without a section)."""
    if config.get("sgtm") is None:
        return None
    return SGTMConfig(**config["sgtm"], strategy=METHODS[config.get("method", SGTM.name)].strategy.name)


def _flat_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if _FLAT in f.metadata]


def _flat_keys(nested_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(nested_cls)} - _NOT_FLAT_KEYS


def _key_types(cls) -> dict[str, Any]:
    """The type of every key a section takes (flat-nested keys included)."""
    flat = _flat_fields(cls)
    found = {name: tp for name, tp in typing.get_type_hints(cls).items() if name not in {f.name for f in flat}}
    for f in flat:
        nested = typing.get_type_hints(f.metadata[_FLAT])
        found.update({key: nested[key] for key in _flat_keys(f.metadata[_FLAT])})
    return found


def _section(cls, values: Any, source: str, name: str, flags: dict[str, str]):
    where = f"{source}: {name}"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    key_types = _key_types(cls)
    for key in set(values) & set(_REPLACED.get(name, {})):
        raise ConfigError(f"{source}: {name}.{key} was removed; use {name}.{_REPLACED[name][key]}")
    unknown = sorted(map(str, set(values) - set(key_types)))
    if unknown:
        raise ConfigError(f"{_origin(source, flags, f'{name}.{unknown[0]}')}: {name}: unknown key(s) {unknown}; "
                          f"known: {sorted(key_types)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = _convert(value, key_types[key])
        except _Mismatch:
            raise ConfigError(f"{_origin(source, flags, f'{name}.{key}')}: {name}.{key}={value!r}: expected "
                              f"{_describe(key_types[key])}") from None
        rule = _RULES.get(name, {}).get(key)
        if rule is not None and converted[key] is not None and not rule[0](converted[key]):
            raise ConfigError(f"{_origin(source, flags, f'{name}.{key}')}: {name}.{key}={value!r}: {rule[1]}")
    try:
        for f in _flat_fields(cls):
            nested_cls = f.metadata[_FLAT]
            converted[f.name] = nested_cls(**{k: converted.pop(k) for k in _flat_keys(nested_cls) if k in converted})
        return cls(**converted)
    except (TypeError, ValueError) as err:  # the dataclass's own checks; some name the key as `section.key`
        blamed = next((key for key in values if f"{name}.{key}" in flags and key in str(err)), None)
        origin = source if blamed is None else _origin(source, flags, f"{name}.{blamed}")
        message = f"{origin}: {err}" if str(err).startswith(f"{name}.") else f"{origin}: {name}: {err}"
        raise ConfigError(message) from err


def from_dict(raw: dict, source: str = "<config>", flags: dict[str, str] | None = None) -> TrainConfig:
    """A validated config from its YAML form; `flags` (`override_flags`) are named in the errors about the keys
    they set."""
    flags = flags or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    unknown = sorted(map(str, set(raw) - set(SECTIONS) - {"method"}))
    if unknown:
        by_flag = [flag for key, flag in flags.items() if key.split(".")[0] == unknown[0]]
        raise ConfigError(f"{f'override {by_flag[0]!r}' if by_flag else source}: unknown section(s) {unknown}; "
                          f"known: {sorted(SECTIONS) + ['method']}")
    if "model" not in raw:
        raise ConfigError(f"{source}: section 'model' is required")
    method = raw.pop("method", SGTM.name)
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{_origin(source, flags, 'method')}: method={method!r}: expected one of {sorted(METHODS)}")
    if isinstance(raw.get("sgtm"), dict) and "strategy" in raw["sgtm"]:
        raise ConfigError(f"{source}: sgtm.strategy was removed; the top-level `method` decides it (one of "
                          f"{sorted(METHODS)})")
    sections = {name: _section(cls, raw.get(name), source, name, flags) for name, cls in SECTIONS.items()}
    cfg = TrainConfig(method=method, **sections)
    cfg.sgtm.strategy = METHODS[method].strategy.name
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"{_origin(source, flags, 'optim.min_lr')}: optim.min_lr={cfg.optim.min_lr}: must be <= "
                          f"optim.lr={cfg.optim.lr}")
    if cfg.optim.warmup_init_lr > cfg.optim.lr:
        raise ConfigError(f"{source}: optim.warmup_init_lr={cfg.optim.warmup_init_lr}: must be <= "
                          f"optim.lr={cfg.optim.lr}")
    if cfg.data.mixture and cfg.data.mode != "packed":
        raise ConfigError(f"{source}: data.mixture replaces data.mode's pools; it needs data.mode=packed, not "
                          f"{cfg.data.mode!r}")
    if cfg.sgtm.mask_embeddings and cfg.model.tie_embeddings:
        raise ConfigError(f"{source}: {TIED_MASK_EMBEDDINGS}")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    source = "<overrides>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = load_yaml(path, ConfigError) or {}
        source = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, list(overrides)), source, override_flags(list(overrides)))


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
    if cfg.train.calibrate_ablated and cfg.train.calibration_steps < 1:
        raise ConfigError(f"train.calibration_steps={cfg.train.calibration_steps}: must be >= 1 with "
                          "train.calibrate_ablated")
    if cfg.checkpoint.pretrained:
        _check_pretrained(cfg)
    if cfg.data.indexed_prefix:
        _check_indexed(cfg)
    elif not cfg.data.path:
        raise ConfigError("data.path is required (a shard directory from `megatron-sgtm data build`), or "
                          "data.indexed_prefix (a Megatron indexed dataset tagged by `megatron-sgtm data tag-indexed`)")
    elif not (Path(cfg.data.path) / "manifest.json").is_file():
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
    _check_categories(cfg)


def _check_indexed(cfg: TrainConfig) -> None:
    """data.indexed_prefix: an index with its sidecar, and the settings the GPTDataset path supports."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    from megatron_sgtm.data.indexed import IndexedLabelsError, read_labels

    data = cfg.data
    if data.path:
        raise ConfigError(f"data.path={data.path} and data.indexed_prefix={data.indexed_prefix}: give one of them")
    if data.mode != "packed" or data.mixture:
        raise ConfigError(f"data.indexed_prefix trains in GPTDataset's sample order; data.mode={data.mode!r} and "
                          "data.mixture need shard data (data.path)")
    if data.eod_id is None or not 0 <= data.eod_id < cfg.model.vocab_size:
        raise ConfigError(f"data.eod_id={data.eod_id}: data.indexed_prefix needs the index's end-of-document token "
                          f"id, below model.vocab_size={cfg.model.vocab_size}")
    weights = r"\d+(\.\d*)?"
    if not re.fullmatch(rf"{weights}(,{weights}){{0,2}}", data.indexed_split.replace(" ", "")) or not (
            parse_and_normalize_split(data.indexed_split)[0] > 0):
        raise ConfigError(f"data.indexed_split={data.indexed_split!r}: expected megatron's 'train,valid,test' "
                          "weights with train > 0, e.g. '98,2,0'")
    try:
        read_labels(data.indexed_prefix, data.indexed_labels)
    except IndexedLabelsError as err:
        raise ConfigError(f"data.indexed_prefix={data.indexed_prefix}: {err}") from err


def data_category_counts(cfg: TrainConfig) -> dict[str, int]:
    """Documents per ground-truth category of the run's data (shards' manifest, or the indexed sidecar)."""
    data = cfg.data
    if data.indexed_prefix:
        from megatron_sgtm.data.indexed import read_labels

        return dict(read_labels(data.indexed_prefix, data.indexed_labels).header["category_counts"])
    try:
        return Manifest.read(Path(data.path)).categories()
    except ShardError:
        raise  # names the manifest and the field itself
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"data.path={data.path}: unreadable manifest.json ({err})") from err


def _check_categories(cfg: TrainConfig) -> None:
    """The category lists name categories the data holds, and a method that needs forget documents has some."""
    data, labeling = cfg.data, cfg.data.labeling
    counts = data_category_counts(cfg)
    where = f"data.indexed_prefix={data.indexed_prefix}" if data.indexed_prefix else f"data.path={data.path}"
    needs_truth = labeling.needs_truth or cfg.data_filter in ("oracle", "strict")
    if data.forget_keep_fraction < 1 and not any(counts.get(name) for name in labeling.forget_categories):
        raise ConfigError(f"data.forget_keep_fraction={data.forget_keep_fraction} keeps a share of the ground-truth "
                          f"forget documents, but data.forget_categories={list(labeling.forget_categories)} selects "
                          f"none of the documents at {where}")
    if not counts:
        if needs_truth:
            raise ConfigError(f"method={cfg.method} with data.score_source={labeling.score_source}, undiscovered_rate="
                              f"{labeling.undiscovered_rate}, false_positive_rate={labeling.false_positive_rate} needs "
                              f"ground-truth categories, but the documents at {where} have none")
        if data.mixture:
            raise ConfigError(f"data.mixture draws its pools by ground-truth category, but the documents at "
                              f"{where} have none")
        return  # tagged scores alone: no category to check a name against
    groups = mixture_groups(cfg)
    mixture = [name for name in data.mixture or {} if name not in groups]
    for key, names in (("forget_categories", labeling.forget_categories), ("retain_categories", data.retain_categories),
                       ("adjacent_categories", data.adjacent_categories), ("mixture", mixture)):
        unknown = [name for name in names if name not in counts]
        if unknown:
            raise ConfigError(f"data.{key}={list(names)}: {unknown} not among the categories of {where} "
                              f"(known: {sorted(counts)}; an empty list [] names none)")
    for name in data.mixture or {}:
        if not sum(counts[category] for category in groups.get(name, [name])):
            raise ConfigError(f"data.mixture: pool {name!r} (categories {groups.get(name, [name])}) selects none of "
                              f"the documents at {where} (categories: {counts})")
    needs_forget = (cfg.data_filter != "none" or METHODS[cfg.method].strategy.active or labeling.undiscovered_rate > 0
                    or labeling.false_positive_rate > 0)
    if needs_forget and not any(counts[name] for name in labeling.forget_categories):
        raise ConfigError(f"method={cfg.method} needs forget documents, but data.forget_categories="
                          f"{list(labeling.forget_categories)} selects none of the documents at {where} "
                          f"(categories: {counts})")


def mixture_groups(cfg: TrainConfig) -> dict[str, list[str]]:
    """The category groups a `data.mixture` key may name."""
    return {"forget": list(cfg.data.labeling.forget_categories), "retain": list(cfg.data.retain_categories),
            "adjacent": list(cfg.data.adjacent_categories)}


def _check_pretrained(cfg: TrainConfig) -> None:
    """checkpoint.pretrained must be a model-only checkpoint of this very model shape."""
    from megatron_sgtm.training.checkpoint import CheckpointError, model_only_meta

    try:
        meta = model_only_meta(Path(cfg.checkpoint.pretrained), cfg.checkpoint.verify)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.pretrained: {err}") from err
    theirs = ModelConfig(**meta["config"]["model"])
    if theirs.dims() != cfg.model.dims() or theirs.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"checkpoint.pretrained={cfg.checkpoint.pretrained}: its model ({meta['config']['model']}) "
                          "does not have this config's model shape")
