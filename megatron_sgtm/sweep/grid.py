"""A sweep grid (YAML): sizes x methods x undiscovered-forget rates x seeds over one base training config.

    base: ../examples/tiny_cpu.yaml        # a training config, relative to the grid file
    out: runs/sweep_tiny                   # runs go to <out>/<run name>/ (relative to the working directory)
    sizes: [tiny-h32, tiny-h64]            # names from the size table (`megatron-sgtm sizes`)
    methods: [sgtm, weak_filter]           # training methods (strategy.METHODS)
    undiscovered_rates: [0.2]              # data.undiscovered_rate
    seeds: [0]                             # train.seed
    budget: {coefficient: 20}              # tokens = coefficient x N^exponent, or {train_steps: N}
    overrides: {data.path: shards}         # section.key: value for every run
    resources: {nodes: 1, gpus_per_node: 8, gpu_memory_gib: 80}   # per run; gpus_per_node 0 = CPU tasks
    layout: auto                           # or {default: {tensor_model_parallel_size: 2}, 1B: {...}}
    slurm: {time: "24:00:00", partition: gpu, max_concurrent: 8}
    variants:                              # named override sets: each is one more point of a curve
      full: {}                             # short form: section.key overrides, for the active methods
      joint_down: {overrides: {sgtm.joint_down_projections: true}, methods: [sgtm]}   # long form
      tau03: {overrides: {data.tau_forget: 0.3}, methods: [weak_filter]}
    forget_keep_fractions: [0.01, 0.1]     # extra `none` runs on that fraction of the forget documents

Methods whose training ignores the labels (`none`, `oracle`) run once per size and seed, not once per
rate. A variant applies to the methods it lists (default: those with an active strategy, i.e. the
ones with a partition); a method no variant applies to runs once, unnamed. `forget_keep_fractions`
adds `none` runs trained on a capped share of the forget documents: the leakage curve (`report`).
`expand` refuses structural mistakes (unknown keys, methods or sizes, layouts that cannot fit)
and `check` runs the trainer's own validation on every run, so nothing is submitted from a bad grid.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sgtm.core.strategy import METHODS
from megatron_sgtm.errors import UserError, load_yaml
from megatron_sgtm.sweep.sizes import (
    SIZES,
    Budget,
    Layout,
    ParamCount,
    SizeError,
    count_parameters,
    estimate_memory_gib,
    model_config,
    recommend_layout,
)
from megatron_sgtm.training.config import (
    ConfigError,
    OptimConfig,
    TrainLoopConfig,
    apply_overrides,
    from_dict,
    validate,
)

KEYS = {"base", "out", "sizes", "methods", "undiscovered_rates", "seeds", "budget", "overrides", "resources",
        "layout", "slurm", "variants", "forget_keep_fractions"}
RESOURCE_KEYS = {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "gpu_memory_gib"}
SLURM_KEYS = {"partition", "account", "time", "max_concurrent", "extra_args"}
PARALLEL_KEYS = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel"}
# Methods whose training does not depend on the F/R/U labels: the undiscovered rate cannot change them.
RATE_FREE = {name for name, m in METHODS.items() if not m.strategy.active and m.data_filter in ("none", "oracle")}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Keys the grid sets per run (or that change the parameter count the budget was computed from).
RUN_KEYS = {"method", "data.undiscovered_rate", "data.forget_keep_fraction", "train.seed", "train.train_steps",
            "checkpoint.dir", "checkpoint.resume", "logging.run_dir", "logging.wandb_group", "logging.wandb_name"}
RUN_SECTIONS = ("model.", "parallel.")


class GridError(UserError, ValueError):
    """A bad sweep grid; the message names the grid file and the field (or run)."""


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU-only tasks
    tasks_per_node: int = 1  # CPU runs only; on GPUs one task per GPU
    cpus_per_task: int | None = None
    gpu_memory_gib: float = 80.0

    @property
    def world_size(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node)


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict  # section.key -> value
    methods: tuple[str, ...]


@dataclass
class Run:
    name: str
    size: str
    method: str
    undiscovered_rate: float | None  # None for the rate-free methods
    seed: int
    params: ParamCount
    train_steps: int
    tokens: int
    layout: Layout | None  # None: the layout was set by hand (or the run is on CPUs)
    config: dict  # the full raw training config of this run
    variant: str | None = None
    forget_keep_fraction: float | None = None  # `none` runs of the leakage curve; None: all forget documents

    @property
    def run_dir(self) -> Path:
        return Path(self.config["logging"]["run_dir"])

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


@dataclass
class Grid:
    path: Path
    name: str
    out: Path
    resources: Resources
    slurm: dict
    runs: list[Run] = field(default_factory=list)

    def pending(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]


def _list(raw: dict, key: str, path: Path, kind: type) -> list:
    value = raw.get(key)
    if value is None:
        raise GridError(f"{path}: '{key}' is required")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise GridError(f"{path}: '{key}' is empty")
    if kind is float:
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1]
        if bad:
            raise GridError(f"{path}: {key}: {bad} are not rates in [0, 1)")
    elif any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        raise GridError(f"{path}: {key}: expected {kind.__name__} values, got {values}")
    if len(set(values)) != len(values):
        raise GridError(f"{path}: {key}: duplicate entries in {values}")
    return values


def _mapping(raw: dict, key: str, path: Path, known: set[str] | None = None) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise GridError(f"{path}: '{key}' must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - known) if known is not None else []
    if unknown:
        raise GridError(f"{path}: {key}: unknown key(s) {unknown}; known: {sorted(known)}")
    return value


def _variants(raw: dict, path: Path, methods: list[str], base: dict) -> list[Variant]:
    """`variants:` as a list; each variant's overrides must apply to the base config."""
    value = raw.get("variants")
    if value is None:
        return []
    if not isinstance(value, dict) or not value:
        raise GridError(f"{path}: variants must be a non-empty mapping of name -> overrides")
    active = [m for m in methods if METHODS[m].strategy.active]
    variants = []
    for name, spec in value.items():
        where = f"{path}: variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise GridError(f"{where}: a variant name is letters, digits, '_', '.' or '-' (it is part of run names)")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise GridError(f"{where}: expected a mapping of section.key overrides, got {spec!r}")
        long_form = bool(spec) and set(spec) <= {"overrides", "methods"}
        overrides = (spec.get("overrides") or {}) if long_form else spec
        chosen = spec.get("methods", active) if long_form else active
        if not isinstance(overrides, dict) or any(not isinstance(k, str) or "." not in k for k in overrides):
            raise GridError(f"{where}: keys must be section.key overrides, or 'overrides' and 'methods'; "
                            f"got {list(overrides) if isinstance(overrides, dict) else overrides!r}")
        fixed = sorted(k for k in overrides if k in RUN_KEYS or k.startswith(RUN_SECTIONS))
        if fixed:
            raise GridError(f"{where}: {fixed} are set by the grid itself (sizes, methods, rates, seeds, budget, "
                            f"layout, forget_keep_fractions), not by a variant")
        if chosen == []:
            raise GridError(f"{where}: applies to no method (none of {methods} has an active strategy); give it "
                            f"'overrides' and 'methods'")
        if not isinstance(chosen, list) or any(m not in methods for m in chosen):
            raise GridError(f"{where}: methods: expected a list of this grid's methods {methods}, got {chosen!r}")
        try:
            apply_overrides(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        except ConfigError as err:
            raise GridError(f"{where}: {err}") from err
        variants.append(Variant(name, dict(overrides), tuple(chosen)))
    return variants


def _fractions(raw: dict, path: Path, methods: list[str]) -> list[float]:
    value = raw.get("forget_keep_fractions")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1]
    if not values or bad:
        raise GridError(f"{path}: forget_keep_fractions: {bad or values} are not fractions in (0, 1) (the `none` "
                        f"run on all forget documents is always there)")
    if len(set(values)) != len(values):
        raise GridError(f"{path}: forget_keep_fractions: duplicate entries in {values}")
    if "none" not in methods:
        raise GridError(f"{path}: forget_keep_fractions: the leakage curve's runs are `none` runs; add none to "
                        f"methods")
    return sorted(values)


def _layouts(raw: dict, path: Path, sizes: list[str]) -> dict[str, dict] | None:
    """None for 'auto'; else size -> parallel keys ('default' applies to sizes not named)."""
    value = raw.get("layout", "auto")
    if value == "auto":
        return None
    if not isinstance(value, dict):
        raise GridError(f"{path}: layout must be 'auto' or a mapping of size -> parallel settings")
    unknown = sorted(set(value) - set(sizes) - {"default"})
    if unknown:
        raise GridError(f"{path}: layout: {unknown} are not sizes of this grid {sizes} (or 'default')")
    for key, par in value.items():
        if not isinstance(par, dict) or set(par) - PARALLEL_KEYS:
            raise GridError(f"{path}: layout.{key}: expected a mapping with keys from {sorted(PARALLEL_KEYS)}, "
                            f"got {par!r}")
    return {size: {**value.get("default", {}), **value.get(size, {})} for size in sizes}


def load(path: str | Path, extra_overrides: list[str] = ()) -> Grid:
    """Parse, validate and expand a grid file (no training config is validated against data here:
    that is `check`). `extra_overrides` are ``section.key=value`` strings applied after the grid's."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    raw = load_yaml(path, GridError) or {}
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    for key in ("base", "out"):
        if not isinstance(raw.get(key), str):
            raise GridError(f"{path}: '{key}' is required (a path)")
    base_path = (path.parent / raw["base"]).resolve()
    if not base_path.is_file():
        raise GridError(f"{path}: base: {base_path} does not exist")
    base = load_yaml(base_path, GridError) or {}

    sizes = _list(raw, "sizes", path, str)
    methods = _list(raw, "methods", path, str)
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise GridError(f"{path}: sizes: {bad} not in the size table (`megatron-sgtm sizes`); known: {list(SIZES)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise GridError(f"{path}: methods: unknown method(s) {bad}; expected some of {sorted(METHODS)}")
    rates = _list(raw, "undiscovered_rates", path, float)
    seeds = _list(raw, "seeds", path, int)
    try:
        budget = Budget(**_mapping(raw, "budget", path, {"coefficient", "exponent", "params", "train_steps"}))
        resources = Resources(**_mapping(raw, "resources", path, RESOURCE_KEYS))
    except (SizeError, TypeError) as err:
        raise GridError(f"{path}: {err}") from err
    if resources.nodes < 1 or resources.gpus_per_node < 0 or resources.tasks_per_node < 1:
        raise GridError(f"{path}: resources: nodes and tasks_per_node must be >= 1, gpus_per_node >= 0")
    slurm = _mapping(raw, "slurm", path, SLURM_KEYS)
    overrides = [f"{k}={json.dumps(v)}" for k, v in _mapping(raw, "overrides", path).items()]
    try:
        base = apply_overrides(base, [*overrides, *extra_overrides])
    except ConfigError as err:
        raise GridError(f"{path}: overrides: {err}") from err
    layouts = _layouts(raw, path, sizes)
    variants = _variants(raw, path, methods, base)
    fractions = _fractions(raw, path, methods)

    grid = Grid(path=path, name=path.stem, out=Path(raw["out"]), resources=resources, slurm=slurm)
    for size in sizes:
        model, layout, parallel = _size_model(path, base, size, resources, layouts)
        count = count_parameters(model)
        batch = (base.get("optim") or {}).get("global_batch_size", OptimConfig.global_batch_size)
        tokens_per_step = int(batch) * model.seq_length
        steps = budget.steps(count, tokens_per_step)
        for method in methods:
            for variant, fraction in _settings(method, variants, fractions):
                for rate in [None] if method in RATE_FREE else rates:
                    for seed in seeds:
                        run = Run(_name(size, method, variant, fraction, rate, seed), size, method, rate, seed,
                                  count, steps, steps * tokens_per_step, layout, {},
                                  variant.name if variant else None, fraction)
                        run.config = _run_config(base, grid, model, run, parallel, variant)
                        grid.runs.append(run)
    return grid


def _name(size: str, method: str, variant: Variant | None, fraction: float | None, rate: float | None,
          seed: int) -> str:
    """e.g. tiny-h32_sgtm_joint_down_u0.2_s0, tiny-h32_none_f0.1_s1."""
    return "_".join([size, method, *([variant.name] if variant else []),
                     *([] if fraction is None else [f"f{fraction:g}"]), *([] if rate is None else [f"u{rate:g}"]),
                     f"s{seed}"])


def _settings(method: str, variants: list[Variant], fractions: list[float]) -> list[tuple[Variant | None,
                                                                                        float | None]]:
    """(variant, forget keep fraction) of each run of `method` per size, rate and seed; fraction None: all."""
    mine = [v for v in variants if method in v.methods] or [None]
    return [(v, f) for v in mine for f in ([None, *fractions] if method == "none" else [None])]


def _size_model(path: Path, base: dict, size: str, resources: Resources, layouts: dict | None):
    try:
        model = model_config(size, base.get("model") or {})
    except (SizeError, TypeError, ValueError) as err:
        raise GridError(f"{path}: size {size}: {err}") from err
    if layouts is not None:
        return model, None, layouts[size]
    if not resources.gpus_per_node:
        return model, None, {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    try:
        layout = recommend_layout(model, resources.world_size, resources.gpus_per_node, resources.gpu_memory_gib,
                                  int((base.get("optim") or {}).get("micro_batch_size", OptimConfig.micro_batch_size)),
                                  bool((base.get("train") or {}).get("bf16", TrainLoopConfig.bf16)))
    except SizeError as err:
        raise GridError(f"{path}: size {size}: {err}") from err
    return model, layout, layout.parallel()


def _run_config(base: dict, grid: Grid, model, run: Run, parallel: dict, variant: Variant | None) -> dict:
    """The base config with this run's variant, shape, method, rate, forget share, seed, steps, layout,
    directories and wandb group (the grid) and name (the run)."""
    run_dir = grid.out / run.name
    cfg = copy.deepcopy(base)
    if variant:
        cfg = apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in variant.overrides.items()])
    shape = {k: getattr(model, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                             "num_query_groups", "ffn_hidden_size")}
    cfg["model"] = {**(cfg.get("model") or {}), **shape}
    cfg["method"] = run.method
    cfg.setdefault("data", {})
    if run.undiscovered_rate is not None:
        cfg["data"]["undiscovered_rate"] = run.undiscovered_rate
    if run.forget_keep_fraction is not None:
        cfg["data"]["forget_keep_fraction"] = run.forget_keep_fraction
    cfg["parallel"] = {**(cfg.get("parallel") or {}), **parallel}
    cfg["train"] = {**(cfg.get("train") or {}), "seed": run.seed, "train_steps": run.train_steps}
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "dir": str(run_dir / "checkpoints"), "resume": "auto"}
    cfg["logging"] = {**(cfg.get("logging") or {}), "run_dir": str(run_dir), "wandb_group": grid.name,
                      "wandb_name": run.name}
    return cfg


def check(grid: Grid) -> list[str]:
    """The trainer's own validation (layout vs world size and heads, partition, batch sizes, data)
    on every run, plus what only a sweep knows (TP inside a node, estimated memory). Returns the
    errors, one line per distinct problem with the runs it affects."""
    problems: dict[str, list[str]] = {}
    res = grid.resources
    for run in grid.runs:
        try:
            cfg = from_dict(run.config, source=f"run {run.name}")
            validate(cfg, res.world_size)
        except (ConfigError, ValueError) as err:
            problems.setdefault(str(err).removeprefix(f"run {run.name}: "), []).append(run.name)
            continue
        par = cfg.parallel
        if res.gpus_per_node and par.tensor_model_parallel_size > res.gpus_per_node:
            problems.setdefault(
                f"parallel.tensor_model_parallel_size={par.tensor_model_parallel_size} spans nodes (gpus_per_node="
                f"{res.gpus_per_node}); keep tensor parallelism inside a node", []).append(run.name)
        if res.gpus_per_node and run.layout is None:
            tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
            memory = estimate_memory_gib(cfg.model, tp, pp, res.world_size // (tp * pp), cfg.optim.micro_batch_size,
                                         cfg.train.bf16)
            if memory > res.gpu_memory_gib:
                problems.setdefault(
                    f"TP={tp} x PP={pp} needs ~{memory:.1f} GiB per GPU, more than resources.gpu_memory_gib="
                    f"{res.gpu_memory_gib:g}", []).append(run.name)
    return [f"{grid.path}: {msg} ({_runs(names, len(grid.runs))})" for msg, names in problems.items()]


def _runs(names: list[str], total: int) -> str:
    if len(names) == total:
        return f"all {total} runs"
    return "runs: " + ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
